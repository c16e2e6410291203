"""Activation checkpointing (``train.gradient_checkpointing``) in one process: the same loss, gradients and
training run as without, with the decoder layers replayed in the backward and fewer activations kept."""

from __future__ import annotations

import pytest
import torch
from repo_utils import repo_params

from pipeline.model import loading, precision
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import batched_logprobs
from pipeline.settings.train import TrainSettings
from pipeline.training import activation_checkpointing, distributed
from pipeline.training.examples import PairExample
from pipeline.training.trainer import PreferenceTrainer, train_preference

TERMS = [("dpo", 1.0, {"beta": 0.5})]


def settings(**overrides) -> TrainSettings:
    base = {k: v for k, v in repo_params()["train"].items() if k not in ("variants", "runtime")}
    # the references are the policy's own log-probs, so the first-step check holds in fp32 and bf16 alike
    return TrainSettings(**{**base, "lr": 1e-3, "batch_size": 6, "grad_accum": 2, "max_length": 64, **overrides})


def examples(model, tok, n: int = 6) -> list[PairExample]:
    """Pairs of varied prompt and response lengths, so each micro-batch pads and masks."""
    ex = []
    for i in range(n):
        p = encode_prompt(tok, f"What is {i} + {i * i}?" + " Think." * (i % 3))
        w = encode_response(tok, f"Answer: {i + i * i}" + " Done." * (i % 2))
        l_ = encode_response(tok, f"Answer: {i + i * i + 1}")
        (rw, rl), _ = batched_logprobs(model, [p, p], [w, l_], tok.pad_token_id, 2)
        ex.append(PairExample(tuple(p), tuple(w), tuple(l_), rw, rl))
    return ex


def one_step(model_dir, ex: list[PairExample], s: TrainSettings, pad_id: int) -> dict:
    """One ``train_step`` over all of ``ex``: its loss, the gradients the optimiser steps with, how often
    decoder layer 0 ran, and the bytes the decoder's forward kept for the backward."""
    model = loading.load_model(model_dir, "float32")
    calls: list[int] = []
    # The decoder's forward (embedding, layers, final norm; not the LM head) is running. Its hooks, not the
    # layers': the checkpoint's replay stops once it has rebuilt what the backward needs, before a layer's
    # forward hook would run.
    inside = [False]

    def leave(*_) -> None:  # a forward hook's return value would replace the output
        inside[0] = False

    model.get_decoder().register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
    model.get_decoder().register_forward_hook(leave)
    model.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    trainer = PreferenceTrainer(model, TERMS, s, pad_id=pad_id, ctx=distributed.Context())
    grads: dict[str, torch.Tensor] = {}

    def keep_gradients(*_):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

    trainer.opt.register_step_pre_hook(keep_gradients)
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # Inside a checkpointed layer the checkpoint's own hooks take the tensors: this one sees none.
        if inside[0]:
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = trainer.train_step(ex, list(range(len(ex))))
    return {"loss": result.loss.item(), "grads": grads, "layer_calls": len(calls), "kept_bytes": sum(kept)}


@pytest.fixture(scope="module")
def pairs(tiny_model_dir):
    tok = loading.load_tokenizer(tiny_model_dir)
    return examples(loading.load_model(tiny_model_dir, "float32").eval(), tok), tok.pad_token_id


@pytest.mark.parametrize(
    "shared_prompt,bf16,cpu_attention",
    [
        (True, False, "math"),  # one row per pair: the 4D attention mask and position ids reach the replayed layers
        (False, False, "math"),
        # bf16 autocast on a CPU also selects the attention kernel (train.cpu_attention), which the backward's
        # replay must select again: in another kernel it would keep other tensors and the checkpoint would fail
        (True, True, "math"),
        (True, True, "flash"),
    ],
)
def test_checkpointing_gives_the_same_loss_and_gradients(
    tiny_model_dir, pairs, monkeypatch, shared_prompt, bf16, cpu_attention
):
    if bf16:
        monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    ex, pad_id = pairs
    base = settings(shared_prompt=shared_prompt, bf16=bf16, cpu_attention=cpu_attention, gradient_checkpointing=False)
    plain = one_step(tiny_model_dir, ex, base, pad_id)
    ckpt = one_step(tiny_model_dir, ex, base.model_copy(update={"gradient_checkpointing": True}), pad_id)
    # 2 micro-batches: layer 0 runs once per forward, and with checkpointing once more in each backward
    assert (plain["layer_calls"], ckpt["layer_calls"]) == (2, 4)
    assert ckpt["kept_bytes"] < plain["kept_bytes"] / 4  # the layers keep their inputs only
    assert ckpt["loss"] == pytest.approx(plain["loss"], abs=1e-6)
    assert plain["grads"].keys() == ckpt["grads"].keys()
    assert max(g.abs().max().item() for g in plain["grads"].values()) > 1e-3  # a real gradient
    for name, g in plain["grads"].items():
        assert torch.allclose(ckpt["grads"][name], g, rtol=0, atol=1e-6), name


def test_checkpointed_training_follows_the_same_run(tiny_model_dir, pairs):
    ex, pad_id = pairs
    runs = []
    for on in (False, True):
        model = loading.load_model(tiny_model_dir, "float32")
        s = settings(epochs=2, bf16=False, gradient_checkpointing=on)
        history = train_preference(model, ex, TERMS, s, pad_id=pad_id)
        runs.append((history, model.state_dict()))
    (h0, w0), (h1, w1) = runs
    assert len(h0) == len(h1) == 2
    for m0, m1 in zip(h0, h1):
        assert m1 == pytest.approx(m0, abs=1e-6)
    assert all(torch.allclose(w1[k], w0[k], rtol=0, atol=1e-6) for k in w0)


def test_a_model_without_checkpointing_is_refused():
    with pytest.raises(ValueError, match=r"train\.gradient_checkpointing: Linear does not support"):
        activation_checkpointing.enable(torch.nn.Linear(2, 2), lambda: precision.autocast("cpu", False, "math"))


def test_the_lm_head_is_replayed_under_checkpointing(tiny_model_dir, pairs, monkeypatch):
    """Under checkpointing the head's [N, vocab] logits are not kept for the backward (at a 49k vocabulary
    they outweigh every layer's input); the backward computes them again, with the same log-probs and
    gradients. Chunked: more scored positions than a chunk take several."""
    from pipeline.model import logprobs
    from pipeline.model.collate import collate_pairs

    monkeypatch.setattr(logprobs, "CHECKPOINTED_HEAD_CHUNK", 16)
    ex, pad_id = pairs
    batch = collate_pairs(
        [e.prompt_ids for e in ex],
        [e.chosen_ids for e in ex],
        [e.rejected_ids for e in ex],
        pad_id,
        64,
        shared_prompt=True,
    )
    assert len(batch.targets) > 2 * 16  # three chunks or more
    model = loading.load_model(tiny_model_dir, "float32")
    vocab = model.config.vocab_size
    runs = []
    for replay in (False, True):
        model.zero_grad()
        shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor, shapes: list = shapes) -> torch.Tensor:
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lp, _ = logprobs.score_batch(model, batch, checkpoint_head=replay)
        (lp[: len(ex)] - lp[len(ex) :]).sum().backward()
        runs.append((lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, shapes))
    (lp0, g0, kept0), (lp1, g1, kept1) = runs
    assert any(s[-1:] == (vocab,) for s in kept0)  # without: the logits are kept
    assert not any(s[-1:] == (vocab,) for s in kept1)
    assert torch.allclose(lp1, lp0, rtol=0, atol=1e-6)
    # the tied embedding's gradient sums the chunks' in another order: fp32 rounding, relative to its size
    for name, g in g0.items():
        assert torch.allclose(g1[name], g, rtol=1e-6, atol=1e-6), name
