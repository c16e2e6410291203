"""The shared chunk folder: a chunk's lease goes to exactly one process, is renewed while held, and is taken
over when its holder is a dead process of this machine or has not renewed it for ``lease_s``; processes
sharing a folder sample disjoint chunks and each gets the whole result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from pipeline.generation.chunk_store import ChunkFolder, holder_id
from pipeline.generation.resumable import plan_chunks, sample_chunks
from pipeline.generation.types import Candidate, GenerationSettings

S = GenerationSettings(n=2, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=0)


def lease_file(folder, key, generation, holder, age_s=0.0):
    """A lease as another process would have left it, last renewed ``age_s`` ago."""
    path = folder / f"chunk-{key}.lease-{generation}"
    path.write_text(json.dumps(holder))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


OTHER_HOST = {"host": "another-machine", "pid": 1}


def test_a_lease_goes_to_one_process_and_is_free_again_once_released(tmp_path):
    a, b = ChunkFolder(tmp_path, lease_s=60), ChunkFolder(tmp_path, lease_s=60)
    lease = a.claim("k")
    assert lease is not None and json.loads(lease.path.read_text()) == holder_id()
    assert b.claim("k") is None  # held by a live process of this machine
    lease.release()
    assert not lease.path.exists()
    again = b.claim("k")
    assert again is not None
    again.release()


def test_a_dead_process_of_this_machine_loses_its_lease_at_once(tmp_path):
    lease_file(tmp_path, "k", 0, {**holder_id(), "pid": dead_pid()})
    lease = ChunkFolder(tmp_path, lease_s=3600).claim("k")
    assert lease is not None and lease.path.name == "chunk-k.lease-1"
    lease.release()


def test_another_machine_keeps_its_lease_until_it_goes_unrenewed_for_lease_s(tmp_path):
    folder = ChunkFolder(tmp_path, lease_s=30)
    lease_file(tmp_path, "k", 0, OTHER_HOST, age_s=20)
    assert folder.claim("k") is None
    lease_file(tmp_path, "k", 0, OTHER_HOST, age_s=31)
    taken = folder.claim("k")
    assert taken is not None and taken.path.name == "chunk-k.lease-1"
    assert ChunkFolder(tmp_path, lease_s=30).claim("k") is None  # the new generation holds
    taken.release()


def test_a_lapsed_lease_is_taken_over_by_exactly_one_of_many(tmp_path):
    lease_file(tmp_path, "k", 3, OTHER_HOST, age_s=100)
    start, won, lock = threading.Barrier(16), [], threading.Lock()

    def contend():
        folder = ChunkFolder(tmp_path, lease_s=30)
        start.wait()
        got = folder.claim("k")
        if got is not None:
            with lock:
                won.append(got)

    threads = [threading.Thread(target=contend) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [w.path.name for w in won] == ["chunk-k.lease-4"]
    won[0].release()


def test_a_held_lease_is_renewed_and_a_finished_chunk_clears_its_leases(tmp_path):
    folder = ChunkFolder(tmp_path, lease_s=1.0)
    lease = folder.claim("k")
    assert lease is not None
    time.sleep(2.5)  # 2.5 times lease_s: without renewal another process could take it
    assert time.time() - lease.path.stat().st_mtime < 1.0
    assert ChunkFolder(tmp_path, lease_s=1.0).claim("k") is None
    lease_file(tmp_path, "k", 0, OTHER_HOST, age_s=100)  # an older generation left behind
    folder.write("k", ["p"], [[Candidate("a", (1, 2), -1.0, "stop"), Candidate("b", (3,), -2.0, "length")]])
    assert not list(tmp_path.glob("*.lease-*"))
    time.sleep(0.5)  # the holder's renewal finds its lease gone and stops
    lease.release()
    assert folder.read("k", ["p"], 2) == [[Candidate("a", (1, 2), -1.0, "stop"), Candidate("b", (3,), -2.0, "length")]]


class SlowSampler:
    """Deterministic candidates from the prompt text, slowly enough that processes overlap."""

    def __init__(self, delay_s: float = 0.05):
        self.prompts_seen: list[str] = []
        self.delay_s = delay_s

    def generate(self, prompts, settings, progress=None):
        time.sleep(self.delay_s)
        self.prompts_seen += list(prompts)
        return [[Candidate(f"{p}/{k}", (len(p), k), -1.0 * k, "stop") for k in range(settings.n)] for p in prompts]

    def close(self):
        pass


def plan(n_prompts=12, chunk=2):
    prompts = [f"q{i}" for i in range(n_prompts)]
    return plan_chunks([f"id{i}" for i in range(n_prompts)], prompts, S, chunk, {"model": "m"})


def test_two_processes_sample_disjoint_chunks_and_both_get_the_whole_result(tmp_path):
    alone, _ = sample_chunks(SlowSampler, plan(), ChunkFolder(tmp_path / "alone", 60), collect=True, progress=None)
    samplers = [SlowSampler(), SlowSampler()]
    out: dict[int, tuple] = {}

    def work(i):
        out[i] = sample_chunks(
            lambda: samplers[i], plan(), ChunkFolder(tmp_path / "shared", 60), collect=i == 0, progress=None
        )

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = [s.prompts_seen for s in samplers]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])  # both worked, no chunk twice
    assert sorted(seen[0] + seen[1]) == sorted(f"q{i}" for i in range(12))
    assert out[0][0] == alone and out[1][0] == []  # the collecting one has every prompt's candidates
    assert out[0][1]["chunks_reused"] == len(seen[1]) // 2  # the other's chunks count as found, not sampled


def test_a_waiting_process_takes_over_a_chunk_whose_holder_stopped_renewing(tmp_path):
    p = plan(n_prompts=6)
    held = p.chunks[1]
    lease_file(tmp_path, held.key, 0, OTHER_HOST)  # a live lease of another machine, never renewed
    sampler = SlowSampler(delay_s=0)
    t0 = time.time()
    out, stats = sample_chunks(lambda: sampler, p, ChunkFolder(tmp_path, lease_s=0.5), collect=True, progress=None)
    assert time.time() - t0 >= 0.5  # it waited for the lease to lapse
    assert sampler.prompts_seen == ["q0", "q1", "q4", "q5", "q2", "q3"]  # the held chunk last
    assert [c[0].text for c in out] == [f"q{i}/0" for i in range(6)] and stats["chunks_reused"] == 0
    assert not list(tmp_path.glob("*.lease-*"))
