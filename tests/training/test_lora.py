"""pipeline/training/lora.py: LoRA training on a tiny random model. Only the adapter trains, the first step
sees the base's log-probs exactly, the merged model scores as base plus adapter, and a resumed run ends
with the uninterrupted run's adapter."""

from __future__ import annotations

import pytest
import torch
from repo_utils import repo_params

from pipeline.model import loading, precision
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import pair_logprobs
from pipeline.settings.train import LoraParams, TrainSettings
from pipeline.training import lora
from pipeline.training.checkpoints import Checkpointing
from pipeline.training.examples import PairExample
from pipeline.training.trainer import RunOptions, train_preference

DPO = [("dpo", 1.0, {"beta": 0.5})]


def lora_params(**overrides) -> LoraParams:
    return LoraParams(**{**repo_params()["train"]["lora"], "r": 8, **overrides})


def settings(lora_: LoraParams, **overrides) -> TrainSettings:
    """The repository's shared train settings in fp32 (the tests compare log-probs to 1e-5) with ``lora_``."""
    base = {k: v for k, v in repo_params()["train"].items() if k not in ("variants", "runtime")}
    return TrainSettings(
        **{**base, "bf16": False, "max_length": 64, "seed": 0, "grad_accum": 1, **overrides, "lora": lora_}
    )


def examples(model, tok, n: int = 6, bf16: bool = False) -> list[PairExample]:
    """Pairs with the reference log-probs of ``model`` (the base), computed as the reference stage does."""
    import polars as pl

    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt_ids": encode_prompt(tok, f"What is {i} + {i}?"),
                "chosen_ids": encode_response(tok, f"Answer: {2 * i}"),
                "rejected_ids": encode_response(tok, f"Answer: {2 * i + 1} or so"),
            }
        )
    pairs = pl.DataFrame(rows)
    rw, rl, _, _ = pair_logprobs(model, pairs, tok.pad_token_id, 4, settings(lora_params(r=0), bf16=bf16))
    return [PairExample(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"]), w, l_)
            for r, w, l_ in zip(rows, rw, rl)]  # fmt: skip


def scores(model, ex: list[PairExample], pad_id: int) -> torch.Tensor:
    import polars as pl

    pairs = pl.DataFrame(
        {"prompt_ids": [e.prompt_ids for e in ex], "chosen_ids": [e.chosen_ids for e in ex],
         "rejected_ids": [e.rejected_ids for e in ex]}
    )  # fmt: skip
    lw, ll, _, _ = pair_logprobs(model.eval(), pairs, pad_id, 4, settings(lora_params(r=0)))
    return torch.tensor(lw + ll, dtype=torch.float64)


def test_only_the_adapter_trains_and_the_loss_falls(tiny_model_dir):
    tok = loading.load_tokenizer(tiny_model_dir)
    base = loading.load_model(tiny_model_dir, "float32")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ex = examples(base, tok)
    cfg = lora_params(r=4)
    model = lora.attach(base, cfg, seed=0)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    adapter0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    hist = train_preference(model, ex, DPO, settings(cfg, lr=3e-3, epochs=8, batch_size=6), pad_id=tok.pad_token_id)

    # every base weight bit-identical; every adapter matrix moved
    after = model.get_base_model().state_dict()
    base_after = {k.replace("base_layer.", ""): v for k, v in after.items() if "lora_" not in k}
    assert base_after.keys() == before.keys() and all(torch.equal(before[k], base_after[k]) for k in before)
    assert all(not torch.equal(adapter0[n], p) for n, p in model.named_parameters() if n in adapter0)
    # the first step is the base's (B = 0); then the loss falls and the margin grows
    assert hist[0]["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(0.0)).item(), abs=1e-5)
    losses = [h["loss"] for h in hist]
    assert losses[-1] < losses[0] - 0.1 and hist[-1]["delta_margin"] > hist[0]["delta_margin"] + 0.3


def test_the_first_step_scores_exactly_as_the_base(tiny_model_dir, monkeypatch):
    """A fresh adapter adds exact zeros (B = 0): under bf16 autocast too, the first step's log-probs are the
    base's bit for bit, so the first-step check against the precomputed reference passes as without LoRA."""
    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    tok = loading.load_tokenizer(tiny_model_dir)
    first = {}
    for r in (0, 8):
        base = loading.load_model(tiny_model_dir, "float32")
        ex = examples(base, tok, bf16=True)
        s = settings(lora_params(r=r, dropout=0.1), bf16=True, lr=1e-3, epochs=1, batch_size=6)
        first[r] = train_preference(lora.attach(base, s.lora, seed=0), ex, DPO, s, pad_id=tok.pad_token_id)[0]
    for key in ("lp_w", "lp_l", "ref_gap_per_token", "ref_gap_mean", "ref_gap_max", "loss"):
        assert first[8][key] == first[0][key], key
    assert first[8]["ref_gap_per_token"] <= repo_params()["train"]["ref_check_tol"]


def test_the_merged_model_scores_as_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = loading.load_tokenizer(tiny_model_dir)
    base = loading.load_model(tiny_model_dir, "float32")
    ex = examples(base, tok)
    cfg = lora_params(r=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = lora.attach(base, cfg, seed=0)
    train_preference(model, ex, DPO, settings(cfg, lr=1e-2, epochs=3, batch_size=3), pad_id=tok.pad_token_id)
    adapted = scores(model, ex, tok.pad_token_id)
    base_lp = scores(loading.load_model(tiny_model_dir, "float32"), ex, tok.pad_token_id)
    assert (adapted - base_lp).abs().max() > 0.05  # the adapter moved the log-probs

    merged = lora.save_and_merge(model, tmp_path)
    loading.write_model(merged, tok, tmp_path)
    assert sorted(p.name for p in (tmp_path / lora.ADAPTER_DIR).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # no peft needed to load it
    assert not any("lora" in k for k in plain.state_dict())
    # 1e-5 nats, and the fp32 rounding of a sum of about 80 nats (an ulp there is 7.6e-6)
    torch.testing.assert_close(scores(plain, ex, tok.pad_token_id), adapted, atol=1e-5, rtol=1e-6)
    # the adapter alone, on a fresh base, is the same model
    again = PeftModel.from_pretrained(loading.load_model(tiny_model_dir, "float32"), tmp_path / lora.ADAPTER_DIR)
    torch.testing.assert_close(scores(again, ex, tok.pad_token_id), adapted, atol=1e-5, rtol=1e-6)


def test_resume_gives_the_adapter_of_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """With adapter dropout (random draws every step) a run resumed from its checkpoint ends with the same
    adapter, optimiser and history as the run that wrote it; the checkpoint holds the adapter alone."""
    tok = loading.load_tokenizer(tiny_model_dir)
    s = settings(lora_params(r=4, dropout=0.2), lr=3e-3, epochs=2, batch_size=3)  # 4 steps
    ck = Checkpointing(str(tmp_path / "run.pt"), every=3, key="k")
    runs = []
    for _ in range(2):
        base = loading.load_model(tiny_model_dir, "float32")
        ex = examples(base, tok)
        model = lora.attach(base, s.lora, seed=s.seed)
        hist = train_preference(model, ex, DPO, s, pad_id=tok.pad_token_id, run=RunOptions(checkpoint=ck))
        runs.append((hist, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    state = torch.load(ck.path, weights_only=False)
    assert state["step"] == 3 and state["model"] and all("lora_" in k for k in state["model"])
    (h1, a1), (h2, a2) = runs
    assert h1 == h2 and a1.keys() == a2.keys()
    assert all(torch.equal(a1[n], a2[n]) for n in a1)


def test_a_full_fine_tune_attaches_nothing(tiny_model_dir):
    model = loading.load_model(tiny_model_dir, "float32")
    assert lora.attach(model, lora_params(r=0), seed=0) is model and lora.record(model, lora_params(r=0)) is None
    assert all(p.requires_grad for p in model.parameters())


def test_lora_under_activation_checkpointing_trains_alike(tiny_model_dir):
    """train.gradient_checkpointing composes with an adapter: the layers (with their adapters) run again in the
    backward, and the losses and the trained adapter are those of the run without it."""
    tok = loading.load_tokenizer(tiny_model_dir)
    runs = {}
    for checkpointed in (False, True):
        base = loading.load_model(tiny_model_dir, "float32")
        ex = examples(base, tok)
        s = settings(lora_params(r=4), lr=3e-3, epochs=2, batch_size=3, gradient_checkpointing=checkpointed)
        model = lora.attach(base, s.lora, seed=s.seed)
        hist = train_preference(model, ex, DPO, s, pad_id=tok.pad_token_id)
        assert model.is_gradient_checkpointing is checkpointed
        runs[checkpointed] = [h["loss"] for h in hist], [p.detach() for p in model.parameters() if p.requires_grad]
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[True][1], runs[False][1]))


def test_a_qlora_run_resumes_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path):
    """Where bitsandbytes is installed (the `qlora` extra; its CPU backend here): saving a checkpoint leaves
    the 4-bit base as it is, and the resumed run ends with the uninterrupted run's history and adapter."""
    pytest.importorskip("bitsandbytes")
    from pipeline.model import quantised

    tok = loading.load_tokenizer(tiny_model_dir)
    s = settings(lora_params(r=4, dropout=0.2, load_in_4bit=True), lr=3e-3, epochs=2, batch_size=3)  # 4 steps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ck = Checkpointing(str(tmp_path / "run.pt"), every=3, key="k")
    runs = []
    for checkpoint in (None, ck, ck):  # uninterrupted; writing a checkpoint after step 3; resuming from it
        base = quantised.load_base(tiny_model_dir, "float32", device, s.lora)
        ex = examples(base, tok)
        model = lora.attach(base, s.lora, seed=s.seed)
        hist = train_preference(model, ex, DPO, s, pad_id=tok.pad_token_id, run=RunOptions(checkpoint=checkpoint))
        runs.append((hist, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (h0, a0), (h1, a1), (h2, a2) = runs  # uninterrupted; writing a checkpoint; resumed from it
    assert h0[0]["ref_gap_max"] == 0.0 and h0 == h1 == h2
    assert all(torch.equal(a0[n], a1[n]) and torch.equal(a0[n], a2[n]) for n in a0)
