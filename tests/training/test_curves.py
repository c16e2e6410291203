"""The per-step means of the fixed sets: what the trainer logs to dvclive and the report plots."""

import random
import subprocess
import sys

import polars as pl
import torch

from pipeline.schema import schema_of
from pipeline.training.curves import fixed_set_means
from pipeline.training.evaluation import fixed_set_metrics


def _rows(seed: int = 0) -> list[dict]:
    """fixed_curves rows of two sets at three steps, with pairs whose gradient ratio is undefined (the
    held-out set's median is over 5 pairs, the training set's over 4), and one set and step where no
    pair has one."""
    rng = random.Random(seed)
    rows = []
    for step in (0, 2, 4):
        for name, n in (("heldout", 7), ("train", 5)):
            for i in range(n):
                undefined = i == 1 or (name == "heldout" and i == 4) or (name == "train" and step == 2)
                ratio = None if undefined else rng.uniform(-3, 3)
                rows.append(
                    {
                        "step": step,
                        "set": name,
                        "pair_id": f"{name}{i}",
                        "lp_w": rng.uniform(-90, -20),
                        "lp_l": rng.uniform(-90, -20),
                        "ref_w": rng.uniform(-90, -20),
                        "ref_l": rng.uniform(-90, -20),
                        "len_w": rng.randint(3, 40),
                        "len_l": rng.randint(3, 40),
                        "log10_grad_ratio": ratio,
                    }
                )
    return rows


def _python_means(rows: list[dict]) -> dict[str, float]:
    """The means of one set at one step as plain Python sums them: row by row."""
    n = len(rows)
    d_w = [r["lp_w"] - r["ref_w"] for r in rows]
    d_l = [r["lp_l"] - r["ref_l"] for r in rows]
    ratios = sorted(r["log10_grad_ratio"] for r in rows if r["log10_grad_ratio"] is not None)
    out = {
        "lp_w": sum(r["lp_w"] for r in rows) / n,
        "lp_l": sum(r["lp_l"] for r in rows) / n,
        "lp_w_per_token": sum(r["lp_w"] / r["len_w"] for r in rows) / n,
        "lp_l_per_token": sum(r["lp_l"] / r["len_l"] for r in rows) / n,
        "delta_w": sum(d_w) / n,
        "delta_l": sum(d_l) / n,
        "delta_margin": (sum(d_w) - sum(d_l)) / n,
        "displaced_share": sum(d < 0 for d in d_w) / n,
    }
    if ratios:
        out["log10_grad_ratio"] = float(torch.tensor(ratios).median())
    return out


def test_fixed_set_means_are_the_row_by_row_means_bit_for_bit():
    rows = _rows()
    means = fixed_set_means(pl.DataFrame(rows, schema=schema_of("fixed_curves")))
    assert means.select("set", "step").rows() == [(s, st) for st in (0, 2, 4) for s in ("heldout", "train")]
    for m in means.iter_rows(named=True):
        got = {k: v for k, v in m.items() if k not in ("set", "step") and v is not None}
        want = _python_means([r for r in rows if r["set"] == m["set"] and r["step"] == m["step"]])
        assert list(got) == list(want) and got == want  # the same names in the same order, the same floats
    assert means.filter((pl.col("set") == "train") & (pl.col("step") == 2))["log10_grad_ratio"].item() is None


def test_the_trainer_logs_each_sets_means_under_its_name():
    """dvclive's keys are ``fixed_<set>_<mean>``, the sets in the order scored; a median of nothing is not logged."""
    rows = [r for r in _rows(seed=1) if r["step"] == 2]
    want = {}
    for name in ("heldout", "train"):
        want.update({f"fixed_{name}_{k}": v for k, v in _python_means([r for r in rows if r["set"] == name]).items()})
    got = fixed_set_metrics(rows)
    assert list(got) == list(want) and got == want
    assert "fixed_train_log10_grad_ratio" not in got and "fixed_heldout_log10_grad_ratio" in got


def test_the_report_reads_the_curves_without_torch():
    # In a fresh interpreter: the test process itself has torch loaded by other tests.
    code = (
        "import sys; import pipeline.analysis.report; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
