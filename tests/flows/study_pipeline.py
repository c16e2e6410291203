"""A pipeline of small Python stages that writes the tables the study and its tuning mode read, in a throwaway
git + DVC repository, so that the flows run in seconds per experiment. Its numbers depend on the params the
flows set:

- ``train.seed``: DPO's held-out Δlp_w is −2 − 0.1·seed plus noise, DPOP's +0.5; accuracy 10 % and 50 %;
- ``pairs.source: judged`` with ``pairs.scenario`` k: DPO's Δlp_w is −0.5 in scenario 1 and −3 elsewhere, and
  scenario 3 makes held-out pairs of the first 20 held-out prompts only;
- ``prepare.n_val``: that many validation prompts; a variant's validation accuracy follows its setting
  (dpo: 0.2 + beta, dpop: 0.6 at lr 5e-6, else 0.3), the starting policy's is 0.25.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml
from repo_utils import commit_git_dvc_repo, repo_params

TABLES_PY = textwrap.dedent("""\
    import json
    import sys
    from pathlib import Path

    import numpy as np
    import polars as pl
    import yaml

    from pipeline.io import write_table

    p = yaml.safe_load(open("params.yaml"))
    n_test, n_val, seed = p["prepare"]["n_test"], p["prepare"]["n_val"], p["train"]["seed"]
    judged = p["pairs"]["source"] == "judged"
    scenario = p["pairs"]["scenario"] if judged else None
    prompts = [f"q{i:03d}" for i in range(n_test)]


    def answers(ids, right, model):
        return pl.DataFrame({"prompt_id": ids, "model": model, "text": "", "extracted_answer": None,
                             "correct": [bool(x) for x in right]})


    if sys.argv[1] == "policy":
        val = [f"v{i:03d}" for i in range(n_val)]
        train = [f"h{i:02d}" for i in range(30)] + [f"t{i:02d}" for i in range(20)]
        pl.DataFrame({"prompt_id": prompts + train + val,
                      "split": ["test"] * n_test + ["train"] * len(train) + ["val"] * n_val}).write_parquet(
            "data/prompts.parquet")
        write_table(answers(prompts, [i % 2 == 0 for i in range(n_test)], "policy"),
                    "data/policy/generations.parquet", "generations")
        Path("metrics").mkdir(exist_ok=True)
        start = {"test_accuracy": 0.5, **({"val_accuracy": 0.25, "n_val": n_val} if n_val else {})}
        Path("metrics/policy.json").write_text(json.dumps(start))
        sys.exit(0)
    if sys.argv[1] == "pairs":
        held = 20 if scenario == 3 else 30
        pl.DataFrame({
            "pair_id": [f"t{i:02d}" for i in range(20)] + [f"p{i:02d}" for i in range(held)],
            "prompt_id": [f"t{i:02d}" for i in range(20)] + [f"h{i:02d}" for i in range(held)],
            "split": ["train"] * 20 + ["heldout"] * held,
            "chosen_policy_logprob": -5.0 * (scenario or 1), "rejected_policy_logprob": -10.0 * (scenario or 1),
            "len_w": 10, "len_l": 10,
            "edit_distance_norm": np.concatenate([np.linspace(0.05, 0.6, 20), np.linspace(0.05, 0.6, 30)[:held]]),
        }).write_parquet("data/pairs.parquet")
        sys.exit(0)
    variant = sys.argv[2]
    setting = {**p["train"], **p["train"]["variants"][variant]}
    rng = np.random.default_rng(10 * seed + (variant == "dpo") + 100 * (scenario or 0))
    ids = pl.read_parquet("data/pairs.parquet").filter(pl.col("split") == "heldout")["pair_id"].to_list()
    n = len(ids)
    shift = (-0.5 if scenario == 1 else -3.0) if judged else -2.0 - 0.1 * seed
    d_w = (shift if variant == "dpo" else 0.5) + 0.3 * rng.normal(size=n)
    out = Path("data/eval") / variant
    out.mkdir(parents=True, exist_ok=True)
    write_table(pl.DataFrame({"pair_id": ids, "variant": variant, "ref_w": -20.0,
                              "ref_l": -25.0, "lp_w": -20.0 + d_w, "lp_l": -30.0 + rng.normal(size=n),
                              "len_w": 17, "len_l": 17, "edit_distance_norm": np.linspace(0.05, 0.6, 30)[:n],
                              "distance_bucket": "x", "ches": 0.0, "ches_norm": 0.0}),
                out / "pairs.parquet", "pair_eval")
    write_table(answers(prompts, rng.random(n_test) < (0.1 if variant == "dpo" else 0.5), variant),
                out / "generations.parquet", "generations")
    if n_val:
        # float(): DVC writes 5e-06 to params.yaml, which YAML 1.1 (PyYAML) reads as a string
        rate = 0.2 + float(setting["beta"]) if variant == "dpo" else (0.6 if float(setting["lr"]) == 5e-6 else 0.3)
        right = [i < round(rate * n_val) for i in range(n_val)]
        write_table(answers([f"v{i:03d}" for i in range(n_val)], right, variant), out / "val_generations.parquet",
                    "generations")
    train = Path("data/train") / variant
    train.mkdir(parents=True, exist_ok=True)
    (train / "notes.txt").write_text(variant)
    if variant == "dpo":  # fixed-set curves of the training subset (dpop's training scored none)
        dist = np.linspace(0.05, 0.6, 20)
        rows = [{"step": step, "set": "train", "pair_id": f"t{i:02d}", "lp_w": -20.0 + d, "lp_l": -30.0,
                 "ref_w": -20.0, "ref_l": -25.0, "len_w": 17, "len_l": 17, "log10_grad_ratio": None}
                for step, ds in ((0, np.zeros(20)), (9, -4.0 + 6.0 * dist + 0.2 * rng.normal(size=20)))
                for i, d in enumerate(ds)]
        write_table(pl.DataFrame(rows), train / "fixed_curves.parquet", "fixed_curves")
    """)

STUDY_DVC_YAML = textwrap.dedent("""\
    stages:
      policy:
        cmd: mkdir -p data/policy && python tables.py policy
        deps: [tables.py]
        params: [prepare.n_test, prepare.n_val]
        outs: [data/policy/generations.parquet, data/prompts.parquet]
        metrics: [metrics/policy.json: {cache: false}]
      pairs:
        cmd: python tables.py pairs
        deps: [tables.py]
        params: [pairs.source, pairs.scenario, pairs.heldout_fraction, pairs.seed]
        outs: [data/pairs.parquet]
      evaluate:
        foreach: [dpo, dpop]
        do:
          cmd: python tables.py eval ${item}
          deps: [tables.py, data/policy/generations.parquet, data/pairs.parquet]
          params: [prepare.n_test, prepare.n_val, train.seed, train.lr, train.variants]
          outs:
            - data/eval/${item}
            - data/train/${item}
    """)


def study_repo(root: Path, study: dict) -> tuple[Path, dict]:
    """The pipeline's repository under ``root``, committed, with the project's params.yaml and ``study`` over
    its ``flows.study``; returns it and those params."""
    repo = root / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(STUDY_DVC_YAML)
    (repo / "tables.py").write_text(TABLES_PY)
    params = repo_params({"flows": {"study": study}})
    if "grid" in study.get("tune", {}):  # a grid replaces params.yaml's, not merged into it
        params["flows"]["study"]["tune"]["grid"] = study["tune"]["grid"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_git_dvc_repo(repo)
    return repo, params
