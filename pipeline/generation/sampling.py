"""Sampling N candidates per prompt behind one interface.

A backend implements :class:`Sampler`; :func:`get_sampler` picks one by the name in
``params.yaml`` (``sample.backend``, ``evaluate.generation.backend``). ``transformers`` runs
anywhere; ``vllm`` (:mod:`pipeline.generation.vllm_backend`, an optional extra imported only when selected)
returns the same :class:`Candidate` records.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from pipeline.model.logprobs import encode_prompt

log = logging.getLogger("pipeline.generation.sampling")


@dataclass(frozen=True)
class GenerationSettings:
    n: int = 1
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, ending with EOS when finish_reason == "stop"
    logprob_sum: float  # summed log-prob of token_ids under the model's own distribution (T = 1)
    finish_reason: str  # "stop" | "length"


class Sampler(Protocol):
    model_id: str

    def generate(self, prompts: Sequence[str], settings: GenerationSettings,
                 progress: str | None = "sampling") -> list[list[Candidate]]:
        """Return ``settings.n`` candidates for each prompt, in prompt order."""

    def close(self) -> None:
        """Free the model / engines (GPU memory) before the caller loads another model."""


class TransformersSampler:
    """Batched ``generate`` with left padding; deterministic for a given seed and batch size."""

    def __init__(self, model_path: str, batch_size: int = 16, dtype: str = "float32", device: str = "auto",
                 model_id: str | None = None):
        from pipeline.model import loading

        self.device = loading.device_for(device)
        self.tokenizer = loading.load_tokenizer(model_path)
        self.model = loading.load_model(model_path, dtype, self.device).eval()
        self.batch_size = batch_size
        self.model_id = model_id or loading.fingerprint(model_path)

    @classmethod
    def from_model(cls, model, tokenizer, model_id: str, batch_size: int = 16) -> "TransformersSampler":
        """Wrap a model already in memory (e.g. right after training) without reloading it."""
        self = cls.__new__(cls)
        self.model, self.tokenizer, self.model_id, self.batch_size = model, tokenizer, model_id, batch_size
        self.device = next(model.parameters()).device
        return self

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def generate(self, prompts, settings, progress: str | None = "sampling"):
        from tqdm.auto import tqdm

        tok, model = self.tokenizer, self.model
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        encoded = [encode_prompt(tok, p) for p in prompts]
        # Sort by length so each batch pads little; results are put back in prompt order.
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        per_batch = max(1, self.batch_size // max(1, settings.n))
        batches = [order[s: s + per_batch] for s in range(0, len(order), per_batch)]
        results: list[list[Candidate] | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, unit="prompt")
        for b, idx in enumerate(batches):
            L = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), L), pad, dtype=torch.long)
            att = torch.zeros_like(ids)
            for r, i in enumerate(idx):
                ids[r, L - len(encoded[i]):] = torch.tensor(encoded[i])
                att[r, L - len(encoded[i]):] = 1
            greedy = settings.temperature == 0
            torch.manual_seed(settings.seed * 1_000_003 + b)
            out = model.generate(
                input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                do_sample=not greedy, temperature=None if greedy else settings.temperature,
                top_p=None if greedy else settings.top_p, top_k=None if greedy else 0,
                num_return_sequences=settings.n, max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad, eos_token_id=eos, return_dict_in_generate=True, output_logits=True)
            gen = out.sequences[:, L:].cpu()
            # Raw logits (before temperature / top-p): the policy's own log-prob of each token.
            logits = torch.stack(out.logits, 1).float().cpu()
            lps = torch.log_softmax(logits, -1).gather(-1, gen[..., None]).squeeze(-1)
            for r, i in enumerate(idx):
                cands = []
                for k in range(settings.n):
                    row = r * settings.n + k
                    toks = gen[row].tolist()
                    stop = eos in toks
                    n_tok = toks.index(eos) + 1 if stop else len(toks)
                    toks = toks[:n_tok]
                    cands.append(Candidate(
                        text=tok.decode(toks, skip_special_tokens=True).strip(),
                        token_ids=tuple(toks), logprob_sum=float(lps[row, :n_tok].sum()),
                        finish_reason="stop" if stop else "length"))
                results[i] = cands
            bar.update(len(idx))
        bar.close()
        return results  # type: ignore[return-value]


def _vllm(model_path: str, **kwargs) -> Sampler:
    from pipeline.generation.vllm_backend import VLLMSampler  # vLLM itself is imported only when an engine starts

    return VLLMSampler(model_path, **kwargs)


SAMPLERS = {"transformers": TransformersSampler, "vllm": _vllm}


def get_sampler(backend: str, model_path: str, **kwargs) -> Sampler:
    if backend not in SAMPLERS:
        raise ValueError(f"sample.backend: unknown backend {backend!r} (available: {sorted(SAMPLERS)})")
    return SAMPLERS[backend](model_path, **kwargs)


# --------------------------------------------------------------------------------------------- resume
CHUNK_COLUMNS = ("prompt_id", "candidate_idx", "text", "token_ids", "logprob_sum", "finish_reason")


def chunk_key(material: dict) -> str:
    import hashlib

    from pipeline.judging.cache import canonical_json

    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]


def sample_resumable(sampler: Sampler, prompt_ids: Sequence[str], prompts: Sequence[str],
                     settings: GenerationSettings, chunk_size: int, cache_dir, identity: dict,
                     progress: str | None = "sampling") -> tuple[list[list[Candidate]], dict]:
    """Sample ``prompts`` in chunks of ``chunk_size``, each chunk saved (atomically) as soon as it is done.

    A chunk's file name is a hash of everything that determines its candidates: ``identity`` (the
    model fingerprint, backend, dtype, batch size ...), ``settings`` and the chunk's prompt ids and
    texts. A rerun after a crash finds the finished chunks and samples only the rest; the chunks are
    fixed by the prompt order, so the resumed result is the one an uninterrupted run gives.
    Returns the candidates in prompt order and ``{chunks, chunks_reused, prompts_reused}``.
    """
    from pathlib import Path

    import polars as pl
    from tqdm.auto import tqdm

    from pipeline.io import atomic_path

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    base = {"identity": identity, "settings": asdict(settings)}
    results: list[list[Candidate]] = []
    reused = reused_prompts = 0
    starts = range(0, len(prompts), chunk_size)
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None, unit="prompt")
    for s in starts:
        ids, texts = list(prompt_ids[s: s + chunk_size]), list(prompts[s: s + chunk_size])
        path = cache / f"chunk-{chunk_key({**base, 'prompt_ids': ids, 'prompts': texts})}.parquet"
        cands = _read_chunk(path, ids, settings.n) if path.exists() else None
        if cands is not None:
            reused += 1
            reused_prompts += len(ids)
        else:
            cands = sampler.generate(texts, settings, progress=None)
            rows = [{"prompt_id": pid, "candidate_idx": k, "text": c.text, "token_ids": list(c.token_ids),
                     "logprob_sum": c.logprob_sum, "finish_reason": c.finish_reason}
                    for pid, per in zip(ids, cands) for k, c in enumerate(per)]
            with atomic_path(path, fsync=True) as tmp:
                pl.DataFrame(rows, schema={"prompt_id": pl.String, "candidate_idx": pl.Int32, "text": pl.String,
                                           "token_ids": pl.List(pl.Int32), "logprob_sum": pl.Float64,
                                           "finish_reason": pl.String}).write_parquet(tmp)
        results.extend(cands)
        bar.update(len(ids))
    bar.close()
    return results, {"chunks": len(starts), "chunks_reused": reused, "prompts_reused": reused_prompts,
                     "cache_dir": str(cache)}


def _read_chunk(path, ids: list[str], n: int) -> list[list[Candidate]] | None:
    """A saved chunk, or None (and a warning) if it is unreadable or not the expected prompts."""
    import polars as pl

    try:
        df = pl.read_parquet(path)
        groups = {pid: g.sort("candidate_idx") for (pid,), g in df.group_by("prompt_id")}
        if set(groups) != set(ids) or any(len(g) != n for g in groups.values()):
            raise ValueError("prompts or candidate counts differ from the chunk's key")
    except Exception as e:  # noqa: BLE001 - a damaged chunk is resampled, never trusted
        log.warning("ignoring cached chunk %s (%s); sampling it again", path, e)
        return None
    return [[Candidate(r["text"], tuple(r["token_ids"]), r["logprob_sum"], r["finish_reason"])
             for r in groups[pid].iter_rows(named=True)] for pid in ids]


def sampler_for(backend: str, model_path: str, *, dtype: str, batch_size: int, vllm=None,
                model_id: str | None = None) -> Sampler:
    """The sampler a stage asks for in params: transformers (batch_size) or vLLM (the ``vllm`` section)."""
    if backend == "vllm":
        return get_sampler("vllm", model_path, dtype=dtype, model_id=model_id,
                           **(vllm.sampler_kwargs() if vllm is not None else {}))
    return get_sampler(backend, model_path, dtype=dtype, batch_size=batch_size, model_id=model_id)


def logprob_check(model_path: str, dtype: str, prompts: Sequence[str], candidates: Sequence[Candidate],
                  batch_size: int = 16) -> dict:
    """Re-score sampled tokens with the training code path; report how far the sampler's log-probs are off."""
    from pipeline.model import loading
    from pipeline.model.logprobs import batched_logprobs

    if not candidates:
        return {"n": 0}
    tok = loading.load_tokenizer(model_path)
    model = loading.load_model(model_path, dtype, loading.device_for()).eval()
    prompt_ids = [encode_prompt(tok, p) for p in prompts]
    resp = [list(c.token_ids) for c in candidates]
    longest = max(len(p) + len(r) for p, r in zip(prompt_ids, resp))
    train_lp, n_tok = batched_logprobs(model, prompt_ids, resp, tok.pad_token_id, batch_size, longest)
    diffs = [c.logprob_sum - t for c, t in zip(candidates, train_lp)]
    per_tok = [abs(d) / max(1, n) for d, n in zip(diffs, n_tok)]
    return {"n": len(diffs), "mean_diff": sum(diffs) / len(diffs), "mean_abs_diff": sum(map(abs, diffs)) / len(diffs),
            "max_abs_diff": max(map(abs, diffs)), "mean_abs_diff_per_token": sum(per_tok) / len(per_tok),
            "dtype": dtype}
