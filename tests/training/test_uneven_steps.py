"""Steps with fewer pairs than processes: 3 and 4 gloo processes, DDP and FSDP2, vs 1 process.

A tail batch of 2 pairs leaves ranks with no pair of their own, and with ``grad_accum`` 2 ranks
hold fewer pairs than micro-batches. Every rank must still run every collective (else a crash or a
hang), and the run must follow the single-process one step by step. One launch per process count
(uneven_worker.py: gloo on CPU) trains every case with both strategies through
:func:`train_preference`, as the train stage does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_utils import repo_params

from pipeline.model import loading
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import batched_logprobs
from pipeline.settings.train import TrainSettings
from pipeline.training.examples import PairExample
from pipeline.training.trainer import RunOptions, train_preference

PROJECT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("uneven_worker.py")
TERMS = [("dpo", 1.0, {"beta": 0.5})]
# Both leave tails shorter than 3 and 4 processes; "accum" has fewer pairs than world * grad_accum in every step.
CASES = {
    "tail": dict(n_pairs=10, batch_size=8, grad_accum=1),  # steps of 8, 2, 8, 2 pairs
    "accum": dict(n_pairs=7, batch_size=5, grad_accum=2),  # steps of 5, 2, 5, 2 pairs
}
# Only the float summation order differs from one process (the all-reduce; which pairs share a
# micro-batch, so its padding length): with 3 and 4 processes, both strategies, the loss agrees to
# about 1e-6, the metrics to about 1e-5 absolute (on summed log-probs of ~60 nats), the weights to a
# few 1e-5 after 4 AdamW steps of lr 1e-3 that move them by 4e-3 (AdamW divides each step by the
# running RMS gradient, so rounding in near-zero gradients grows up to lr per step). A padding row
# that leaked into the loss or a mean would move it by a pair's worth (O(0.1) on the loss, nats on lp_w).
LOSS_TOL, METRIC_REL, METRIC_ABS, WEIGHT_TOL = 1e-5, 1e-5, 5e-5, 1e-4


def _settings(**overrides) -> TrainSettings:
    base = {k: v for k, v in repo_params()["train"].items() if k not in ("variants", "runtime")}
    # the references are offset from the policy on purpose (pairs start apart), so the first-step
    # reference check, which expects them equal, is set out of the way
    # fp32: the tolerances below are fp32 rounding; under bf16 (the default on CPUs with native bf16) each
    # rank's gradient sum over its own rows is rounded to bf16 before the all-reduce, far above them
    return TrainSettings(
        **{**base, "ref_check_tol": 10.0, "tail": "keep", "bf16": False, **overrides}
    )  # the tails are the point


def _examples(model, tok, n: int) -> list[PairExample]:
    """Pairs of varied lengths (so micro-batches pad differently), with the policy's own log-probs as reference."""
    ex = []
    for i in range(n):
        p = encode_prompt(tok, f"What is {i} + {i * i}?" + " Think." * (i % 3))
        w = encode_response(tok, f"Answer: {i + i * i}" + " Done." * (i % 2))
        l_ = encode_response(tok, f"Answer: {i + i * i + 1}")
        (rw, rl), _ = batched_logprobs(model, [p, p], [w, l_], tok.pad_token_id, 2)
        ex.append(PairExample(tuple(p), tuple(w), tuple(l_), rw, rl))
    return ex


def _decided(metrics: dict, step: int) -> dict:
    """The metrics a run must reproduce. Before the first update the policy is the reference, so
    accuracy and the displaced shares compare Δ's that are rounding noise: left out at step 0."""
    noise = ("accuracy", "displaced_share") if step == 0 else ()
    return {k: v for k, v in metrics.items() if not k.startswith(noise)}


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> dict:
    """The cases: examples, bucket labels and settings (4 steps each: 2 epochs)."""
    tok = loading.load_tokenizer(tiny_model_dir)
    model = loading.load_model(tiny_model_dir, "float32").eval()
    cases = []
    for c in CASES.values():
        ex = _examples(model, tok, c["n_pairs"])
        s = _settings(lr=1e-3, epochs=2, batch_size=c["batch_size"], grad_accum=c["grad_accum"], max_length=64, seed=0)
        cases.append(
            {
                "examples": ex,
                "terms": TERMS,
                "settings": s,
                "buckets": ["near" if i % 3 else "far" for i in range(len(ex))],
            }
        )
    return {"model": str(tiny_model_dir), "pad_id": tok.pad_token_id, "cases": cases, "strategies": ["ddp", "fsdp"]}


def _train(spec: dict, case: dict) -> dict:
    model = loading.load_model(spec["model"], "float32")
    history = train_preference(
        model,
        case["examples"],
        case["terms"],
        case["settings"],
        pad_id=spec["pad_id"],
        run=RunOptions(buckets=case["buckets"]),
    )
    return {"history": history, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.fixture(scope="module")
def one_process(spec) -> list[dict]:
    return [_train(spec, case) for case in spec["cases"]]


def _run_workers(spec: dict, nproc: int, tmp: Path) -> dict[str, list[dict]]:
    """Train every case with every strategy in ``nproc`` gloo processes: {strategy: rank 0's results}."""
    torch.save(spec, tmp / "spec.pt")
    cmd = [sys.executable, str(WORKER), str(nproc), str(tmp / "spec.pt"), str(tmp / "out.pt")]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-6000:]
    return torch.load(tmp / "out.pt", weights_only=False)


# the multi-process runs cost about a minute each on 2 cores: slow (the slot assignment is unit-tested above)
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [3, 4])
def test_short_tails_match_one_process(spec, one_process, tmp_path, nproc):
    runs = _run_workers(spec, nproc, tmp_path)
    start = loading.load_model(spec["model"], "float32").state_dict()
    assert list(runs) == ["ddp", "fsdp"]
    for strategy, results in runs.items():
        for name, one, many in zip(CASES, one_process, results):
            where = (strategy, name)
            h1, hn = one["history"], many["history"]
            assert len(h1) == len(hn) == 4, where
            assert [m["loss"] for m in hn] == pytest.approx([m["loss"] for m in h1], abs=LOSS_TOL), where
            # Every diagnostic, bucket shares included: padding rows must reach none of them.
            for step, (m1, mn) in enumerate(zip(h1, hn)):
                assert mn.keys() == m1.keys(), (*where, step)
                assert _decided(mn, step) == pytest.approx(_decided(m1, step), rel=METRIC_REL, abs=METRIC_ABS), (
                    *where,
                    step,
                )
            w1, wn = one["weights"], many["weights"]
            assert max((w1[k] - start[k]).abs().max().item() for k in w1) > 1e-3, where  # it did train
            assert max((w1[k] - wn[k]).abs().max().item() for k in w1) < WEIGHT_TOL, where
