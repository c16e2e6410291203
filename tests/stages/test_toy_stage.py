"""Stage `toy`: the history table, one figure per scenario and the metrics, each written atomically."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
from repo_utils import write_params

from pipeline.analysis.toy import HISTORY_COLUMNS


def test_stage_writes_outputs(tmp_path):
    from stages import toy as stage

    cfg = {"toy": {"steps": 15, "sft_steps": 50, "losses": ["dpo", "hinge"], "scenarios": [1, 2], "seeds": [0, 1, 2]}}
    pfile = write_params(tmp_path / "params.yaml", cfg)
    stage.main(["--params", str(pfile)], root=tmp_path)
    df = pl.read_parquet(tmp_path / "data/toy/history.parquet")
    assert df.height == 3 * 2 * 2 * 16 and df.columns == list(HISTORY_COLUMNS)
    pngs = sorted(p.name for p in (tmp_path / "reports/toy").iterdir())
    assert pngs == ["scenario_1.png", "scenario_2.png"]
    assert all((tmp_path / "reports/toy" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)
    m = json.loads((tmp_path / "metrics/toy.json").read_text())
    assert set(m) == {"dpo", "hinge"} and set(m["dpo"]) == {"scenario_1", "scenario_2"}
    final = m["dpo"]["scenario_1"]
    assert final["seeds"] == 3
    assert final["p_chosen"] == pytest.approx(
        df.filter((pl.col("loss") == "dpo") & (pl.col("scenario") == 1) & (pl.col("step") == 15))["p_chosen"].mean()
    )
    assert all(v is None or math.isfinite(v) for d in m.values() for s in d.values() for v in s.values())
    # no temporary files left behind
    assert not [p for p in tmp_path.rglob("*.tmp")]
