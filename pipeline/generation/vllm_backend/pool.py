"""Data-parallel vLLM engines: one spawned process per engine, each pinned to its GPUs, each given
a contiguous shard of every call's prompts; the results come back in prompt order."""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import traceback
from collections.abc import Sequence
from dataclasses import asdict

from pipeline.generation.types import GenerationSettings
from pipeline.generation.vllm_backend.engine import ENGINE_FACTORY, EngineSettings, RawSeq, load_factory

log = logging.getLogger("pipeline.vllm")
# How long the pool waits for its engine processes to answer one job before it gives up on them: a
# guard against a dead engine, far longer than any real job.
ENGINE_WAIT_S = 86400.0


def shard(n_items: int, n_shards: int) -> list[range]:
    """Contiguous, balanced shards of ``range(n_items)`` (the first ones one longer); empty shards dropped."""
    n_shards = max(1, min(n_shards, n_items))
    size, extra = divmod(n_items, n_shards)
    out, start = [], 0
    for i in range(n_shards):
        end = start + size + (1 if i < extra else 0)
        out.append(range(start, end))
        start = end
    return [r for r in out if len(r)] or [range(0)]


def device_groups(n_engines: int, tp: int, visible: Sequence[str]) -> list[str | None]:
    """GPUs of each engine as a CUDA_VISIBLE_DEVICES string; None for every engine on a CPU machine."""
    if not visible:
        return [None] * n_engines
    if n_engines * tp > len(visible):
        raise ValueError(
            f"vllm: data_parallel_size {n_engines} x tensor_parallel_size {tp} needs "
            f"{n_engines * tp} GPUs, {len(visible)} visible ({','.join(visible)})"
        )
    return [",".join(visible[i * tp : (i + 1) * tp]) for i in range(n_engines)]


def assemble(parts: Sequence[range], results: dict[int, list]) -> list:
    """Put per-shard results back in prompt order (shard ``j`` covers the prompts in ``parts[j]``)."""
    out: list = [None] * sum(len(r) for r in parts)
    for j, r in enumerate(parts):
        if len(results[j]) != len(r):
            raise RuntimeError(f"engine for shard {j} returned {len(results[j])} results for {len(r)} prompts")
        for i, res in zip(r, results[j]):
            out[i] = res
    return out


def _engine_process(
    rank: int, devices: str | None, factory: str, engine_settings: dict, eos_id: int | None, inbox, outbox
) -> None:
    """Body of one data-parallel engine process: build the engine, then serve jobs until None."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        engine = load_factory(factory)(EngineSettings(**engine_settings), eos_id)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        outbox.put(("error", rank, None, traceback.format_exc()))
        return
    outbox.put(("ready", rank, None, None))
    while (job := inbox.get()) is not None:
        job_id, prompt_ids, prompts, settings = job
        try:
            outbox.put(("done", rank, job_id, engine.run(prompt_ids, prompts, settings)))
        except BaseException:  # noqa: BLE001
            outbox.put(("error", rank, job_id, traceback.format_exc()))
    engine.close()


class EnginePool:
    """``n`` engine processes (spawned: CUDA must not be initialised before they pin their GPUs)."""

    def __init__(
        self,
        n: int,
        engine_settings: EngineSettings,
        eos_id: int | None,
        factory: str = ENGINE_FACTORY,
        devices: Sequence[str | None] | None = None,
        start_timeout_s: float = 1800,
    ):
        ctx = multiprocessing.get_context("spawn")
        devices = list(devices) if devices is not None else [None] * n
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(n)]
        # Not daemonic: a vLLM engine starts processes of its own, which daemonic processes may not.
        self.procs = [
            ctx.Process(
                target=_engine_process,
                daemon=False,
                name=f"vllm-engine-{i}",
                args=(i, devices[i], factory, asdict(engine_settings), eos_id, self.inboxes[i], self.outbox),
            )
            for i in range(n)
        ]
        for p in self.procs:
            p.start()
        ready = 0
        while ready < n:
            kind, rank, _, err = self._get(start_timeout_s)
            if kind == "error":
                self.close()
                raise RuntimeError(f"vLLM engine {rank} failed to start:\n{err}")
            ready += 1
        log.info("%d vLLM engines ready (devices %s)", n, devices)

    def _get(self, timeout: float):
        while True:
            try:
                return self.outbox.get(timeout=min(timeout, 5.0))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"vLLM engine process(es) {dead} died") from None
                timeout -= 5.0
                if timeout <= 0:
                    self.close()
                    raise TimeoutError("vLLM engines did not answer in time") from None

    def run(
        self, prompt_ids, prompts, settings: GenerationSettings, wait_s: float = ENGINE_WAIT_S
    ) -> list[list[RawSeq]]:
        parts = shard(len(prompts), len(self.procs))
        for job_id, (r, inbox) in enumerate(zip(parts, self.inboxes)):
            inbox.put((job_id, [prompt_ids[i] for i in r], [prompts[i] for i in r], settings))
        results: dict[int, list] = {}
        while len(results) < len(parts):
            kind, rank, job_id, payload = self._get(wait_s)
            if kind == "error":
                self.close()
                raise RuntimeError(f"vLLM engine {rank} failed:\n{payload}")
            results[job_id] = payload
        return assemble(parts, results)

    def close(self) -> None:
        for inbox, p in zip(self.inboxes, self.procs):
            if p.is_alive():
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
