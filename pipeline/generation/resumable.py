"""Resumable, shareable sampling: prompts sampled in chunks, each chunk saved as soon as it is done in a chunk
folder that any number of processes (on any number of machines) work through together; a killed process's
chunks are sampled again by the next."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from pipeline.generation.chunk_store import ChunkFolder
from pipeline.generation.types import Candidate, GenerationSettings, Sampler
from pipeline.io import canonical_json

log = logging.getLogger("pipeline.generation.resumable")


def chunk_key(material: dict) -> str:
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Chunk:
    key: str
    prompt_ids: list[str]
    prompts: list[str]


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of one sampling job, in prompt order, and how they are decoded."""

    settings: GenerationSettings
    chunks: list[Chunk]


def plan_chunks(
    prompt_ids: Sequence[str], prompts: Sequence[str], settings: GenerationSettings, chunk_size: int, identity: dict
) -> ChunkPlan:
    """``prompts`` cut into chunks of ``chunk_size`` in the order given, each keyed by a hash of everything that
    determines its candidates: ``identity`` (the model fingerprint, backend, dtype, batch size ...),
    ``settings`` and the chunk's prompt ids and texts. Every process that plans the same job gets the same keys."""
    base = {"identity": identity, "settings": asdict(settings)}
    chunks = []
    for s in range(0, len(prompts), chunk_size):
        ids, texts = list(prompt_ids[s : s + chunk_size]), list(prompts[s : s + chunk_size])
        chunks.append(Chunk(chunk_key({**base, "prompt_ids": ids, "prompts": texts}), ids, texts))
    return ChunkPlan(settings, chunks)


def sample_chunks(
    make_sampler: Callable[[], Sampler],
    plan: ChunkPlan,
    folder: ChunkFolder,
    *,
    collect: bool,
    progress: str | None = "sampling",
) -> tuple[list[list[Candidate]], dict]:
    """Work through ``plan`` with the other processes sharing ``folder`` until every chunk is finished.

    Each pass takes every chunk that is neither finished nor leased, samples it and saves it; a chunk another
    process holds is looked at again on the next pass, a ``folder.poll_s`` later, until it is finished or its
    lease lapses (then this process takes it over). The sampler is made (``make_sampler``) at the first chunk
    this process samples, so a process that finds every chunk finished never loads a model.
    With ``collect``, returns every prompt's candidates in prompt order (read back from the folder where another
    process or an earlier run sampled them); without, an empty list. Either way with
    ``{chunks, chunks_reused, prompts_reused}``: the chunks found finished rather than sampled here.
    """
    from tqdm.auto import tqdm

    found: list[list[list[Candidate]] | None] = [None] * len(plan.chunks)
    state = _Worker(make_sampler, plan.settings, folder)
    reused = reused_prompts = 0
    pending = list(range(len(plan.chunks)))
    bar = tqdm(total=sum(len(c.prompts) for c in plan.chunks), desc=progress, disable=progress is None, unit="prompt")
    try:
        while pending:
            held_elsewhere, sampled_before = [], state.sampled
            for i in pending:
                chunk = plan.chunks[i]
                got = state.take(chunk)
                if got is None:
                    held_elsewhere.append(i)
                    continue
                cands, sampled_here = got
                if not sampled_here:
                    reused += 1
                    reused_prompts += len(chunk.prompts)
                found[i] = cands if collect else []
                bar.update(len(chunk.prompts))
            if held_elsewhere and state.sampled == sampled_before:  # nothing to do but wait for the others
                time.sleep(folder.poll_s)
            pending = held_elsewhere
    finally:
        bar.close()
        state.close()
    results = [c for per in found for c in (per or [])] if collect else []
    return results, {"chunks": len(plan.chunks), "chunks_reused": reused, "prompts_reused": reused_prompts}


class _Worker:
    """One process's part: the sampler, made at the first chunk it samples, and the chunks it sampled."""

    def __init__(self, make_sampler: Callable[[], Sampler], settings: GenerationSettings, folder: ChunkFolder):
        self.make_sampler, self.settings, self.folder = make_sampler, settings, folder
        self.sampler: Sampler | None = None
        self.sampled = 0

    def take(self, chunk: Chunk) -> tuple[list[list[Candidate]], bool] | None:
        """The chunk's candidates and whether this process sampled them; None while another process holds it."""
        n = self.settings.n
        cands = self.folder.read(chunk.key, chunk.prompt_ids, n)
        if cands is not None:
            return cands, False
        lease = self.folder.claim(chunk.key)
        if lease is None:
            return None
        with lease:
            cands = self.folder.read(chunk.key, chunk.prompt_ids, n)  # finished between the look and the claim
            if cands is not None:
                return cands, False
            if self.sampler is None:
                self.sampler = self.make_sampler()
            cands = self.sampler.generate(chunk.prompts, self.settings, progress=None)
            self.folder.write(chunk.key, chunk.prompt_ids, cands)
        self.sampled += 1
        return cands, True

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
