"""Sampler vs training log-probs: re-score sampled tokens with the training code path and report
how far the sampler's own log-probs are off (``sample.logprob_check`` candidates)."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.generation.types import Candidate


def logprob_check(
    model_path: str, dtype: str, prompts: Sequence[str], candidates: Sequence[Candidate], batch_size: int
) -> dict:
    """Re-score sampled tokens with the training code path; report how far the sampler's log-probs are off.

    ``batch_size``: sequences per forward pass of the training code path."""
    from pipeline.model import loading
    from pipeline.model.encoding import encode_prompt
    from pipeline.model.logprobs import batched_logprobs

    if not candidates:
        return {"n": 0}
    model, tok = loading.load_policy(model_path, dtype, loading.device_for())
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    resp = [list(c.token_ids) for c in candidates]
    longest = max(len(p) + len(r) for p, r in zip(prompt_ids, resp))
    train_lp, n_tok = batched_logprobs(model, prompt_ids, resp, tok.pad_token_id, batch_size, longest)
    diffs = [c.logprob_sum - t for c, t in zip(candidates, train_lp)]
    per_tok = [abs(d) / max(1, n) for d, n in zip(diffs, n_tok)]
    return {
        "n": len(diffs),
        "mean_diff": sum(diffs) / len(diffs),
        "mean_abs_diff": sum(map(abs, diffs)) / len(diffs),
        "max_abs_diff": max(map(abs, diffs)),
        "mean_abs_diff_per_token": sum(per_tok) / len(per_tok),
        "dtype": dtype,
    }
