"""Resumable sampling: prompts sampled in chunks, each chunk saved as soon as it is done, so a
killed stage reruns only the chunks it had not finished."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict

from pipeline.generation.types import Candidate, GenerationSettings, Sampler
from pipeline.io import canonical_json

log = logging.getLogger("pipeline.generation.resumable")

CHUNK_COLUMNS = ("prompt_id", "candidate_idx", "text", "token_ids", "logprob_sum", "finish_reason")


def chunk_key(material: dict) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]


def sample_resumable(
    sampler: Sampler,
    prompt_ids: Sequence[str],
    prompts: Sequence[str],
    settings: GenerationSettings,
    chunk_size: int,
    cache_dir,
    identity: dict,
    progress: str | None = "sampling",
) -> tuple[list[list[Candidate]], dict]:
    """Sample ``prompts`` in chunks of ``chunk_size``, each chunk saved (atomically) as soon as it is done.

    A chunk's file name is a hash of everything that determines its candidates: ``identity`` (the
    model fingerprint, backend, dtype, batch size ...), ``settings`` and the chunk's prompt ids and
    texts. A rerun after a crash finds the finished chunks and samples only the rest; the chunks are
    fixed by the prompt order, so the resumed result is the one an uninterrupted run gives.
    Returns the candidates in prompt order and ``{chunks, chunks_reused, prompts_reused}`` (no path:
    the caller knows where ``cache_dir`` is and records it as it sees fit).
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
        ids, texts = list(prompt_ids[s : s + chunk_size]), list(prompts[s : s + chunk_size])
        path = cache / f"chunk-{chunk_key({**base, 'prompt_ids': ids, 'prompts': texts})}.parquet"
        cands = _read_chunk(path, ids, settings.n) if path.exists() else None
        if cands is not None:
            reused += 1
            reused_prompts += len(ids)
        else:
            cands = sampler.generate(texts, settings, progress=None)
            rows = [
                {
                    "prompt_id": pid,
                    "candidate_idx": k,
                    "text": c.text,
                    "token_ids": list(c.token_ids),
                    "logprob_sum": c.logprob_sum,
                    "finish_reason": c.finish_reason,
                }
                for pid, per in zip(ids, cands)
                for k, c in enumerate(per)
            ]
            with atomic_path(path, fsync=True) as tmp:
                pl.DataFrame(
                    rows,
                    schema={
                        "prompt_id": pl.String,
                        "candidate_idx": pl.Int32,
                        "text": pl.String,
                        "token_ids": pl.List(pl.Int32),
                        "logprob_sum": pl.Float64,
                        "finish_reason": pl.String,
                    },
                ).write_parquet(tmp)
        results.extend(cands)
        bar.update(len(ids))
    bar.close()
    return results, {"chunks": len(starts), "chunks_reused": reused, "prompts_reused": reused_prompts}


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
    return [
        [
            Candidate(r["text"], tuple(r["token_ids"]), r["logprob_sum"], r["finish_reason"])
            for r in groups[pid].iter_rows(named=True)
        ]
        for pid in ids
    ]
