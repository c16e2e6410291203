"""The generated pages (pipeline/pages/): every page in the repository equals what its JSON gives, the check
fails when a JSON value changes without regenerating, and the renderers print the figures of a findings
record that the report's own code computed."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.analysis.findings import StatSettings, json_safe
from pipeline.analysis.report import VariantInputs, compute_report, findings_record
from pipeline.pages import bench, build, results, scale, studies

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = StatSettings(alpha=0.05, level=0.95, n_resamples=200, seed=0, drastic_drop_orders=1.0)


def _copy_sources(dest: Path) -> Path:
    """The generated pages and the JSON they are made from, in a fresh tree."""
    for rel in [
        *build.PAGES,
        results.STUDY_JSON,
        results.REPORT_JSON,
        scale.ASSUMPTIONS,
        scale.PARAMS,
        studies.SCENARIOS_JSON,
        studies.TUNING_JSON,
        *(p.relative_to(ROOT).as_posix() for p in (ROOT / bench.BENCH_DIR).glob("*.json")),
    ]:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def test_every_generated_page_in_the_repository_is_up_to_date():
    assert build.main(["--check", "--root", str(ROOT)]) == 0, (
        f"stale generated pages {build.stale_pages(ROOT)}: run python -m pipeline.pages"
    )


def test_the_check_fails_naming_the_page_when_a_json_value_changes(tmp_path: Path, capsys):
    root = _copy_sources(tmp_path)
    assert build.main(["--check", "--root", str(root)]) == 0
    study = root / results.STUDY_JSON
    data = json.loads(study.read_text())
    data["claims"][0]["estimate"] -= 1.0  # one figure, not regenerated
    study.write_text(json.dumps(data))
    assert build.main(["--check", "--root", str(root)]) == 1
    assert f"stale: {results.PAGE}" in capsys.readouterr().out
    assert build.stale_pages(root) == [results.PAGE]

    bench_json = sorted((root / bench.BENCH_DIR).glob("*.json"))[0]
    data = json.loads(bench_json.read_text())
    data["results"][next(iter(data["results"]))]["tok_per_s"] = 1234.5
    bench_json.write_text(json.dumps(data))
    assert build.stale_pages(root) == [bench.PAGE, results.PAGE]

    assert build.main(["--root", str(root)]) == 0  # regenerating makes the check pass again
    assert build.main(["--check", "--root", str(root)]) == 0
    assert "1234.5" in (root / bench.PAGE).read_text()


def test_a_missing_page_is_stale(tmp_path: Path):
    root = _copy_sources(tmp_path)
    (root / bench.PAGE).unlink()
    assert build.stale_pages(root) == [bench.PAGE]


def _variant(rng, shift: float, n_right: int) -> VariantInputs:
    """A small variant: 30 held-out pairs whose chosen moves by ``shift`` nats, 40 test prompts, fixed curves."""
    n = 30
    d_w = rng.normal(shift, 0.3, n)
    pairs = pl.DataFrame(
        {
            "pair_id": [f"p{i:02d}" for i in range(n)],
            "ref_w": [-20.0] * n,
            "ref_l": [-25.0] * n,
            "lp_w": -20.0 + d_w,
            "lp_l": -27.0 + rng.normal(0, 0.3, n),
            "edit_distance_norm": np.linspace(0, 0.9, n),
            "distance_bucket": ["[0.00,0.50)"] * 15 + ["[0.50,1.00]"] * 15,
            "ches": -3.0 * d_w + rng.normal(0, 0.05, n),
            "ches_norm": -d_w + rng.normal(0, 0.02, n),
        }
    )
    answers = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < n_right for i in range(40)]})
    fixed = pl.DataFrame(
        [
            {
                "step": st,
                "set": w,
                "pair_id": f"p{i:02d}",
                "lp_w": -20.0 + d_w[i] * st / 8,
                "lp_l": -25.0 - 2 * st / 8,
                "ref_w": -20.0,
                "ref_l": -25.0,
                "len_w": 10,
                "len_l": 12,
                "log10_grad_ratio": 0.1 * st,
            }
            for st in (0, 4, 8)
            for w in ("heldout", "train")
            for i in range(n)
        ]
    )
    probe = pl.DataFrame(
        [{"step": st, "probe": f"q{i}", "greedy_lp": -5.0 + 0.1 * st * (i % 3)} for st in (0, 8) for i in range(8)]
    )
    return VariantInputs(eval={"heldout": {}}, pairs=pairs, answers=answers, history={}, fixed=fixed, probe=probe)


@pytest.fixture(scope="module")
def findings() -> dict:
    """A findings record as the report stage writes it (``json_safe`` of ``findings_record``)."""
    rng = np.random.default_rng(0)
    start = pl.DataFrame({"prompt_id": [f"q{i:02d}" for i in range(40)], "correct": [i < 20 for i in range(40)]})
    distances = pl.DataFrame(
        {
            "pair_id": [f"p{i:02d}" for i in range(30)],
            "edit_distance_norm": np.linspace(0, 0.9, 30),
            "distance_bucket": ["[0.00,0.50)"] * 15 + ["[0.50,1.00]"] * 15,
        }
    )
    figures = compute_report(
        start, {"dpo": _variant(rng, -1.0, 4), "dpop": _variant(rng, 0.2, 21)}, {}, SETTINGS, distances
    )
    record = findings_record(figures)
    return json.loads(json.dumps(json_safe(record)))  # through JSON, as the page reads it


def _rows(md: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split(" | ")]
        for line in md.splitlines()
        if line.startswith(f"| {first_cell} ")
    ]


def test_results_page_prints_each_figure_with_its_interval_and_test(tmp_path: Path, findings: dict):
    (tmp_path / results.REPORT_JSON).parent.mkdir(parents=True)
    (tmp_path / results.REPORT_JSON).write_text(json.dumps(findings))
    md = results.results_page(tmp_path)
    assert "Not yet run: `reports/findings.json`" not in md
    assert "95 % intervals" in md and "200 resamples" in md and "α = 0.05" in md

    h = findings["variants"]["dpo"]["heldout"]
    (held,) = [r for r in _rows(md, "`dpo`") if r[1] == str(h["n"])]
    mean = f"{h['delta_w']['estimate']:+.2f} [{h['delta_w']['low']:+.2f}, {h['delta_w']['high']:+.2f}]"
    assert held[2] == mean and held[-1].startswith(f"sign test, n = {h['below_test']['n']}, p ")
    assert all(re.fullmatch(r"[+-]\d+\.\d\d \[[+-]\d+\.\d\d, [+-]\d+\.\d\d\]", c) for c in held[2:6])

    acc = next(f for f in findings["variants"]["dpo"]["findings"] if f["kind"] == "accuracy")["figures"]
    assert acc["difference"]["high"] < 0  # 4 of 40 right after against 20 of 40 before: it fell
    (row,) = [r for r in _rows(md, "`dpo`") if r[1].startswith("10.0% [")]
    assert row[3] == f"{acc['only_before']} / {acc['only_after']}" and row[4].endswith("< α = 0.05")
    assert _rows(md, "starting")[0][1].startswith("50.0% [")

    for f in (f for v in findings["variants"].values() for f in v["findings"]):
        assert f["text"] in md  # every finding's sentence, as the report words it
    assert "**likelihood displacement**" in md and "**test accuracy fell**" in md
    assert "`dpop` − `dpo` on the same pairs" in md
    assert "trained (fixed training subset)" in md and "ρ, CHES_norm" in md


def test_results_page_says_not_yet_run_without_its_json(tmp_path: Path):
    md = results.results_page(tmp_path)
    assert "Not yet run: `reports/findings.json` is absent" in md
    assert "Not yet run: `reports/study/summary.json` is absent" in md
    assert "Not yet run: `reports/scenarios/summary.json` is absent" in md
    assert "Not yet run: `reports/tuning/summary.json` is absent" in md


def _write(root: Path, rel: str, record: dict) -> dict:
    """``record`` through JSON into ``root/rel``, as the flows write it and the page reads it."""
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(json.dumps(record, allow_nan=False))
    return json.loads((root / rel).read_text())


def test_results_page_prints_the_scenario_study_and_the_tuned_comparison(tmp_path: Path):
    from study_runs import scenario_runs, variant_runs

    from pipeline.analysis import study_report, tuning

    _, record = study_report.study_report(
        scenario_runs({1: -0.5, 2: -3.0, 3: -3.0, 4: -3.0}), {"dpo": "dpo"}, SETTINGS, "t", "scenario command"
    )
    scen = _write(tmp_path, studies.SCENARIOS_JSON, {**record, "command": "scenario command", "failed": []})
    runs = variant_runs()
    _, record = study_report.study_report(runs, {"dpo": "dpo", "dpop": "dpop"}, SETTINGS, "t", "tuning command")
    answers = tuning.GridPoint("g-dpo-0", "dpo", {"lr": 1e-5, "beta": 0.1}, runs[0].after)
    kept = {"dpo": answers}
    tuned = tuning.tuning_record(
        {"dpo": {"lr": [1e-5], "beta": [0.1]}},
        0,
        tuning.grid_rows([answers], kept, SETTINGS),
        0.25,
        kept,
        tuning.comparisons(runs, ["dpo", "dpop"], SETTINGS),
    )
    run = {"seconds": {"grid": 1500, "kept settings": 1260}, "cpus": 2}
    tune = _write(
        tmp_path,
        studies.TUNING_JSON,
        {**record, "tuning": tuned, "command": "tuning command", "failed": [], "run": run},
    )
    md = results.results_page(tmp_path)
    scenarios = md.split("## The data scenarios")[1].split("## The tuned comparison")[0]
    assert "`reports/scenarios/summary.json`, written by `scenario command`" in scenarios
    for c in scen["claims"]:  # every claim row with its verdict, claim 3's among them
        assert f"| {c['claim']} | [{c['source']}](losses.md#claims) | {c['scenario']} |" in scenarios
    ordering = [c for c in scen["claims"] if c["source"] == "claim 3"]
    assert len(ordering) == 4 and all(c["verdict"] == "reproduced" for c in ordering)
    chosen = scen["scenarios"]["pair_sets"][2]["chosen_per_token"]
    assert (
        f"| scenario 3 | policy/other | 3 | 40 of 50 | 40 | 40 | {chosen['estimate']:+.3f} "
        f"[{chosen['low']:+.3f}, {chosen['high']:+.3f}] |" in scenarios
    )
    assert len(_rows(scenarios, "scenario 2")) == 1 + 1 + 3  # pairs table, per variant, three seeds of McNemar
    tuned_md = md.split("## The tuned comparison")[1]
    assert "| `dpo` | lr 1e-05, beta 0.1 | `g-dpo-0` | " in tuned_md and "**kept**" in tuned_md
    (c,) = tune["tuning"]["comparisons"]
    acc = c["accuracy_difference"]
    assert f"| `dpop` − `dpo` | 0, 1, 2 | {acc['estimate'] * 100:+.1f} [" in tuned_md and "3 of 3 |" in tuned_md
    assert "Its experiments took grid 25 min, kept settings 21 min (2 CPUs)." in tuned_md
    assert "answers 25.0 % of them" in tuned_md and "`dpo`: lr ∈ {1e-05}, beta ∈ {0.1}" in tuned_md


def test_results_page_reads_nulls_as_not_available(tmp_path: Path, findings: dict):
    """JSON holds null for a figure with no value (a variant without held-out pairs): the page says n/a."""
    findings = copy.deepcopy(findings)  # the fixture is shared by the module's tests
    findings["variants"]["dpo"]["heldout"]["delta_w"] = {"estimate": None, "low": None, "high": None, "level": 0.95}
    (tmp_path / results.REPORT_JSON).parent.mkdir(parents=True)
    (tmp_path / results.REPORT_JSON).write_text(json.dumps(findings))
    (row,) = [r for r in _rows(results.results_page(tmp_path), "`dpo`") if r[1] == "30"]
    assert row[2] == "n/a"


def test_bench_page_has_a_table_per_kind_and_a_row_for_an_unknown_file(tmp_path: Path):
    folder = tmp_path / bench.BENCH_DIR
    folder.mkdir(parents=True)
    run = {"startup_s": 2.0, "wall_s": 10.0, "tokens": 1000, "tok_per_s": 100.0, "end_to_end_s": 12.0}
    (folder / "a.json").write_text(
        json.dumps(
            {
                "args": {
                    "prompts": 4,
                    "n": 2,
                    "max_new_tokens": 8,
                    "dtype": "float32",
                    "batch_size": 8,
                    "compiled": False,
                },
                "results": {
                    "transformers": {**run, "logprob_check": None},
                    "vllm": {
                        **run,
                        "tok_per_s": 400.0,
                        "end_to_end_s": 4.0,
                        "logprob_check": {
                            "n": 16,
                            "mean_abs_diff": 0.01,
                            "mean_abs_diff_per_token": 0.001,
                            "max_abs_diff": 0.05,
                            "dtype": "float32",
                        },
                    },
                    "ratio_tok_per_s": 4.0,
                },
            }
        )
    )
    (folder / "b.json").write_text(json.dumps({"something": "else"}))
    (folder / "c.json").write_text("{not json")
    (folder / "d.json").write_text(
        json.dumps({"gpus": [], "quick": True, "peak": {"skipped": "no GPU"}, "nccl": {"passed": False, "world": 2}})
    )
    md = bench.bench_page(tmp_path)
    assert (
        "| `a.json` | transformers | 4 × 2, 8 tokens | float32 | batch 8 sequences | 2.0 | 10.0 | 1000 | 100.0 |" in md
    )
    assert "| `a.json` | 4.00 | 3.00 |" in md  # tokens/s ratio as recorded, end to end 12 s / 4 s
    assert "| `a.json` | vllm | float32 | 16 | 0.0100 |" in md
    assert "| `b.json` | a shape this page does not know (top level: `something`) |" in md
    assert "| `c.json` | not readable as JSON" in md
    assert "| `d.json` | no GPU | peak | skipped: no GPU |" in md and "**failed its check**" in md
    assert "Trainer" not in md  # no trainer bench, no trainer table


def test_bench_page_has_a_row_per_setting_of_the_memory_bench(tmp_path: Path):
    """Ours against TRL per architecture and setting, an out-of-memory side written as such, and the GPU
    checks' per-setting parts as rows of their own."""
    folder = tmp_path / bench.BENCH_DIR
    folder.mkdir(parents=True)
    ran = {"tokens_per_s": 300.0, "tokens_per_cpu_s": 150.0, "abs_peak_mb": 2048.0}
    memory = {
        "bench": "memory",
        "settings": {"batch_size": 8, "prompt_tokens": 256, "response_tokens": 128, "steps": 2, "dtype": "float32"},
        "environment": {"device": "cpu", "cpu_count": 2, "trl": "1.16.0"},
        "architectures": {
            "smollm2-1.7b": {
                "n_params": 1_711_376_384,
                "results": {
                    "ours_full": {"config": "ours_full", "out_of_memory": "estimated: ..."},
                    "trl_full": {"config": "trl_full", "out_of_memory": "estimated: ..."},
                    "ours_lora_ckpt": {**ran, "abs_peak_mb": 7 * 1024},
                    "trl_lora_ckpt": {**ran, "tokens_per_s": 100.0, "abs_peak_mb": 14 * 1024},
                },
                "comparison": {
                    "full": {"goal": "n/a", "why": "ours and TRL did not run to the end"},
                    "lora_ckpt": {
                        "tokens_per_s": 3.0,
                        "tokens_per_cpu_s": 2.5,
                        "abs_peak_mb": 0.5,
                        "goal": "met",
                        "fits": {"peak_mb": 8192, "met": True},
                    },
                },
            }
        },
    }
    (folder / "m.json").write_text(json.dumps(memory))
    gpu = {
        "gpus": ["H100"],
        "quick": False,
        "args": {"large_batch": 8, "quick": False},  # the command line: no row of its own
        "large_mfu": {
            "full": {"mfu": 0.41},
            "ckpt": {"failed": "ValueError: ..."},
            "lora": {"failed": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 6.00 GiB"},
        },
    }
    (folder / "g.json").write_text(json.dumps(gpu))
    md = bench.bench_page(tmp_path)
    rows = {r[4]: r for r in _rows(md, "`m.json`")}
    assert list(rows) == ["full", "lora_ckpt"]
    assert rows["full"][3] == "smollm2-1.7b (1711M)"
    assert rows["full"][5:8] == ["out of memory", "out of memory", "n/a"]
    assert rows["full"][12] == "n/a (ours and TRL did not run to the end)"
    assert rows["lora_ckpt"][5:12] == ["300.0", "100.0", "3.00", "2.50", "7.00", "14.00", "0.50"]
    assert rows["lora_ckpt"][12] == "met; fits 8 GiB: yes"
    assert [r[2:] for r in _rows(md, "`g.json`")] == [
        ["large_mfu.full", "ran", "mfu 0.41"],
        ["large_mfu.ckpt", "failed", "n/a"],
        ["large_mfu.lora", "out of GPU memory", "n/a"],
    ]


DOC_PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def test_docs_hold_no_commit_hashes_or_dates():
    """The docs describe the code as it is: no commit-hash-like tokens, no calendar dates."""
    hexlike = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,12}(?![\w/-])")
    date = re.compile(
        r"\b(19|20)\d\d-(0[1-9]|1[0-2])(-\d\d)?\b|\b(January|February|March|April|May|June|July|"
        r"August|September|October|November|December) (19|20)\d\d\b"
    )
    for page in DOC_PAGES:
        text = page.read_text(encoding="utf-8")
        assert not hexlike.findall(text), (page.name, hexlike.findall(text))
        assert not date.search(text), (page.name, date.search(text))


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_docs_links_point_at_files_and_headings_that_exist():
    """Every relative link of the README and docs/ names a file of the repository, and a heading in it."""
    link = re.compile(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)")
    for page in DOC_PAGES:
        for target, anchor in link.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://")):
                continue
            path = (page.parent / target).resolve() if target else page
            assert path.is_file(), (page.name, target)
            if anchor:
                assert anchor in _anchors(path), (page.name, target, anchor)
