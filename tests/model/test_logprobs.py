"""Log-probs on a tiny random model with SmolLM2's real tokenizer."""

import contextlib
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from pipeline.model import loading, precision
from pipeline.model.collate import collate, collate_pairs
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import (
    pair_logprobs,
    reference_check,
    score_batch,
    score_batch_via_forward,
    sequence_logprobs,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return loading.load_model(tiny_model_dir, "float32").eval(), loading.load_tokenizer(tiny_model_dir)


def test_response_only_logprobs_match_full_logits(tiny):
    model, tok = tiny
    prompts = [encode_prompt(tok, "What is 2 + 2?"), encode_prompt(tok, "Hi")]
    responses = [encode_response(tok, "4"), encode_response(tok, "Hello there, friend")]
    ids, att, resp = collate(prompts, responses, tok.pad_token_id)
    got, counts = sequence_logprobs(model, ids, att, resp)
    want = reference_check(model, ids, att, resp)
    assert torch.allclose(got, want, atol=1e-4)
    assert counts.tolist() == [len(r) for r in responses]
    # Padding must not change a row's value: score the rows one at a time.
    for i in range(2):
        s, _ = sequence_logprobs(model, *collate([prompts[i]], [responses[i]], tok.pad_token_id))
        assert s.item() == pytest.approx(got[i].item(), abs=1e-4)


def test_truncation_keeps_the_response():
    ids, att, resp = collate([[1] * 50], [[7, 8, 9]], pad_id=0, max_length=20)
    assert ids.shape[1] == 20 and resp.sum().item() == 3 and ids[0, -3:].tolist() == [7, 8, 9]


def test_one_precision_choice_for_training_reference_and_evaluation(tiny, monkeypatch):
    # train.bf16: bf16 autocast on GPUs, and on CPUs only where bf16 is native (AVX512-BF16 or AMX).
    assert precision.uses_bf16_autocast("cuda:0", True) and not precision.uses_bf16_autocast("cuda", False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not precision.uses_bf16_autocast("cpu", True)
    model, tok = tiny
    prompts = [encode_prompt(tok, "What is 2 + 2?"), encode_prompt(tok, "Hi")]
    chosen = [encode_response(tok, "4, it is four"), encode_response(tok, "Hello there, friend")]
    rejected = [encode_response(tok, "5"), encode_response(tok, "Go away")]
    pairs = pl.DataFrame({"prompt_ids": prompts, "chosen_ids": chosen, "rejected_ids": rejected})

    def scored(bf16: bool) -> list[float]:  # the reference stage's and evaluation's code path
        train = SimpleNamespace(max_length=256, bf16=bf16, shared_prompt=True, cpu_attention="math")
        lw, ll, _, _ = pair_logprobs(model, pairs, tok.pad_token_id, 2, train)
        return lw + ll

    fp32 = scored(False)
    assert scored(True) == fp32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.uses_bf16_autocast("cpu", True) and not precision.uses_bf16_autocast("cpu", False)
    native = scored(True)
    assert native != pytest.approx(fp32, abs=1e-4)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    # Where it applies, pair_logprobs scores under bf16 autocast.
    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    bf16 = scored(True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # bf16 autocast with the math attention kernel (batch-invariant; see the test below)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        want, _ = score_batch(model, collate_pairs(prompts, chosen, rejected, tok.pad_token_id, shared_prompt=True))
    assert bf16 == pytest.approx(want.tolist(), abs=1e-4) and bf16 != pytest.approx(fp32, abs=1e-4)
    assert native == bf16


def test_native_bf16_is_read_from_the_cpu_flags():
    """torch's own probes, against what the kernel says this CPU has."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert precision.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def _pairs(tok):
    """Pairs whose responses differ in length both ways, and one the same on both sides."""
    prompts = [encode_prompt(tok, q) for q in ("What is 2 + 2?", "Hi", "Name three prime numbers below 20.")]
    chosen = [encode_response(tok, t) for t in ("4, it is four", "Hello", "2, 3 and 5")]
    rejected = [encode_response(tok, t) for t in ("5", "Hello there, my good friend, how are you?", "2, 3 and 9")]
    return prompts, chosen, rejected


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_layout_scores_as_each_response_after_its_own_prompt(tiny_model_dir, attention):
    """One row per pair (prompt + chosen + rejected, the rejected masked from the chosen) gives each
    response the log-prob, token count and gradient it has after its own copy of the prompt."""
    model = loading.load_model(tiny_model_dir, "float32").eval()
    model.set_attn_implementation(attention)
    tok = loading.load_tokenizer(tiny_model_dir)
    prompts, chosen, rejected = _pairs(tok)
    padded = collate_pairs(prompts, chosen, rejected, tok.pad_token_id, shared_prompt=False)
    shared = collate_pairs(prompts, chosen, rejected, tok.pad_token_id, shared_prompt=True)
    assert shared.input_ids.shape[0] == 3 and padded.input_ids.shape[0] == 6
    want, want_n = score_batch(model, padded)
    assert want_n.tolist() == [len(r) for r in chosen + rejected]
    # independently: each response alone after its prompt, full logits
    alone = [
        reference_check(model, *collate([p], [r], tok.pad_token_id)).item()
        for p, r in zip(prompts * 2, chosen + rejected)
    ]
    assert want.tolist() == pytest.approx(alone, abs=1e-4)
    got, got_n = score_batch(model, shared)
    assert got_n.tolist() == want_n.tolist() and got.tolist() == pytest.approx(want.tolist(), abs=1e-4)
    via_forward, _ = score_batch_via_forward(model, *shared.args())  # FSDP2's path
    assert via_forward.tolist() == pytest.approx(want.tolist(), abs=1e-4)

    def grads(batch):
        model.zero_grad()
        s, _ = score_batch(model, batch)
        (s[:3] - 2 * s[3:]).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g_padded, g_shared = grads(padded), grads(shared)
    assert torch.allclose(g_shared, g_padded, rtol=1e-3, atol=1e-5)


def test_shared_prompt_rejected_does_not_see_the_chosen(tiny):
    model, tok = tiny
    prompts, chosen, rejected = _pairs(tok)
    a, _ = score_batch(model, collate_pairs(prompts, chosen, rejected, tok.pad_token_id, shared_prompt=True))
    other = [c[:-1] + [tok.encode(" seven", add_special_tokens=False)[0]] * 3 + c[-1:] for c in chosen]
    b, _ = score_batch(model, collate_pairs(prompts, other, rejected, tok.pad_token_id, shared_prompt=True))
    assert b[3:].tolist() == pytest.approx(a[3:].tolist(), abs=1e-5)  # rejected: unchanged
    assert all(abs(x - y) > 1e-3 for x, y in zip(b[:3].tolist(), a[:3].tolist()))  # chosen: changed


def test_shared_prompt_truncation_keeps_what_the_longer_response_leaves():
    batch = collate_pairs(
        [list(range(100, 150))], [[7, 8, 9]], [list(range(10, 22))], pad_id=0, max_length=20, shared_prompt=True
    )
    # the rejected (12 tokens) leaves 8 prompt tokens; both sides follow the same 8, neither is cut
    assert batch.input_ids[0].tolist() == list(range(142, 150)) + [7, 8, 9] + list(range(10, 22))
    assert torch.bincount(batch.rows).tolist() == [3, 12]
    assert batch.position_ids[0, 11:].tolist() == list(range(8, 20))  # the rejected restarts after the prompt
    # a response longer than max_length: the prompt keeps max_length // 4 tokens, both responses are cut
    long = collate_pairs([list(range(100, 150))], [list(range(30))], [[5]], pad_id=0, max_length=20, shared_prompt=True)
    assert long.input_ids[0, :5].tolist() == list(range(145, 150)) and torch.bincount(long.rows).tolist() == [15, 1]


def test_shared_prompt_needs_an_attention_that_takes_a_4d_mask(tiny_model_dir):
    model = loading.load_model(tiny_model_dir, "float32").eval()
    model.config._attn_implementation = "flash_attention_2"  # not installed here: only the check is exercised
    tok = loading.load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match=r"train\.shared_prompt needs .*flash_attention_2"):
        score_batch(model, collate_pairs(*_pairs(tok), tok.pad_token_id, shared_prompt=True))


def _batched_pair_scores(model, pairs, batch_size: int, kernel) -> torch.Tensor:
    """Each pair's (lp_w, lp_l) scored in batches of ``batch_size`` inside ``kernel()``."""
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        batch = collate_pairs(*zip(*chunk), 0, 160, shared_prompt=True)
        with torch.no_grad(), kernel():
            lp, _ = score_batch(model, batch)
        out.append(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], 1))
    return torch.cat(out)


def test_bf16_log_probs_on_cpu_do_not_depend_on_the_batch(tiny, monkeypatch):
    """Under train.bf16 on a CPU, a pair scores the same alone or beside longer pairs: the reference
    stage, training's first step and the fixed sets batch the same pairs differently. Plain bf16
    autocast (CPU flash attention, blocked by the batch's padded length) does not."""
    import random

    model, _ = tiny
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    rng = random.Random(0)
    pairs = [
        (
            [rng.randrange(5, 2000) for _ in range(rng.randint(20, 90))],
            [rng.randrange(5, 2000) for _ in range(rng.randint(3, 30))],
            [rng.randrange(5, 2000) for _ in range(rng.randint(3, 30))],
        )
        for _ in range(12)
    ]
    ours = lambda: precision.autocast("cpu", True, "math")  # noqa: E731
    alone, together = _batched_pair_scores(model, pairs, 1, ours), _batched_pair_scores(model, pairs, 12, ours)
    assert torch.equal(alone, together)
    plain = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    flash_alone, flash_together = (_batched_pair_scores(model, pairs, b, plain) for b in (1, 12))
    assert not torch.equal(flash_alone, flash_together)  # what the math kernel removes
    # train.cpu_attention: flash gives the fused kernel's figures, a rounding away from the math kernel's
    flash = lambda b: _batched_pair_scores(model, pairs, b, lambda: precision.autocast("cpu", True, "flash"))  # noqa: E731
    assert torch.equal(flash(1), flash_alone) and torch.equal(flash(12), flash_together)
    assert not torch.equal(flash(12), together)
    assert torch.allclose(flash(12), together, rtol=0, atol=0.05)
    fp32 = _batched_pair_scores(model, pairs, 12, contextlib.nullcontext)
    assert not torch.equal(together, fp32)  # it is bf16


def test_an_unknown_cpu_attention_kernel_is_refused():
    with pytest.raises(ValueError, match=r"train\.cpu_attention: one of math, flash, got 'fused'"):
        with precision.autocast("cpu", True, "fused"):
            pass
