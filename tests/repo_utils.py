"""Helpers for tests that run the real pipeline in a temporary git + DVC repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def repo_params(overrides: dict | None = None) -> dict:
    """The repository's params.yaml (the one source of every default) with ``overrides`` merged in."""
    from pipeline.settings.base import merged

    return merged(yaml.safe_load((PROJECT / "params.yaml").read_text()), overrides or {})


def write_params(path: Path, overrides: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(repo_params(overrides), sort_keys=False))
    return path


def tiny_params(model_dir: Path, other_dir: Path | None = None) -> dict:
    p = repo_params()
    p["prepare"].update(n_train=10, n_test=4, n_warmup=4)
    p["policy"].update(model=str(model_dir))
    p["policy"]["warmup"].update(batch_size=4, lr=1e-3)
    p["policy"]["eval"].update(max_new_tokens=6, batch_size=8)
    # transformers: a tiny model samples in less time than a vLLM engine takes to start
    p["sample"].update(backend="transformers", n=3, max_new_tokens=6, batch_size=12, logprob_check=4)
    # Scenarios 3 and 4: another model's samples (a second tiny random model)
    p["sample_other"].update(
        model=str(other_dir or model_dir), backend="transformers", n=2, max_new_tokens=6, batch_size=12, logprob_check=4
    )
    # A random tiny model gets every answer wrong, so all its groups tie: pair the gold solution
    # against its worst sample (scenario 2, judged pairs) to have something to train on.
    p["pairs"].update(source="judged", scenario=2, heldout_fraction=0.3)
    p["reference"].update(max_length=96)
    p["train"].update(epochs=1, batch_size=4, lr=1e-4, max_length=96)
    p["evaluate"]["generation"].update(max_new_tokens=6, batch_size=8)
    p["toy"].update(steps=20, sft_steps=50, losses=["dpo", "dpop"], scenarios=[1])
    # 4 held-out pairs: 1000 resamples instead of 9999 (the Spearman bootstraps are per resample, ~0.3 ms each)
    p["report"].update(bootstrap_resamples=1000)
    return p


STAGE_WORKSPACE_PAIRS = 8  # one pair per prompt; odd ones held out (their prompts are test prompts)


def write_stage_workspace(root: Path, model_dir: Path) -> Path:
    """What the stages after `pairs` read, under ``root``: the policy folder (a copy of ``model_dir``),
    prompts and preference pairs (train and held-out) and params.yaml naming that policy."""
    import polars as pl

    from pipeline.io import write_table
    from pipeline.model import loading
    from pipeline.model.encoding import encode_prompt, encode_response

    shutil.copytree(model_dir, root / "models/policy")
    tok = loading.load_tokenizer(model_dir)
    prompts, pairs = [], []
    for i in range(STAGE_WORKSPACE_PAIRS):
        q = f"What is {i} + {3 * i}?" + " Be brief." * (i % 3)
        split = "heldout" if i % 2 else "train"
        prompts.append(
            {
                "prompt_id": f"p{i}",
                "split": "test" if i % 2 else "train",
                "question": q,
                "prompt": q,
                "answer": str(4 * i),
                "solution": None,
                "source": "test",
            }
        )
        w = encode_response(tok, "So" + " then" * (2 * i % 5) + f" {4 * i}")
        l_ = encode_response(tok, f"It is {4 * i + 1}" + ", surely" * (i % 4))
        pairs.append(
            {
                "pair_id": f"p{i}-s1",
                "prompt_id": f"p{i}",
                "split": split,
                "prompt_ids": encode_prompt(tok, q),
                "chosen_ids": w,
                "rejected_ids": l_,
                "chosen_text": "",
                "rejected_text": "",
                "chosen_source": "policy",
                "rejected_source": "policy",
                "chosen_correct": True,
                "rejected_correct": False,
                "chosen_sampler_logprob": None,
                "rejected_sampler_logprob": None,
                "chosen_policy_logprob": -1.0,
                "rejected_policy_logprob": -2.0,
                "scenario": 1,
                "edit_distance": 3,
                "edit_distance_norm": 0.3,
                "first_diff": 0,
                "len_w": len(w),
                "len_l": len(l_),
                "ches": -1.0,
                "ches_norm": -0.1,
            }
        )
    write_table(pl.DataFrame(prompts), root / "data/prompts.parquet", "prompts")
    write_table(pl.DataFrame(pairs), root / "data/pairs.parquet", "pairs")
    write_params(
        root / "params.yaml",
        {
            "policy": {"model": str(root / "models/policy")},
            "evaluate": {"generation": {"max_new_tokens": 4, "batch_size": 4}},
        },
    )
    return root


def make_repo(root: Path, params: dict) -> Path:
    repo = root / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(PROJECT / name, repo / name)
    for pkg in ("pipeline", "stages"):
        shutil.copytree(PROJECT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit_git_dvc_repo(repo)
    return repo


def commit_git_dvc_repo(repo: Path) -> None:
    """``repo`` as a git repository with DVC (analytics off) and everything in it committed."""
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        run(cmd, repo)


def copy_repo(src: Path, dst: Path) -> Path:
    """A private copy of a built repository (git, DVC cache and outputs), so that a test can change it
    without touching what other tests see."""
    shutil.copytree(src, dst, symlinks=True)
    return dst


def run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(cwd),
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=2400)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout + proc.stderr


def run_module(module: str, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` with this checkout's package, as a user runs a tool; the
    caller checks the exit status."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def set_param(repo: Path, path: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    node = params
    *parents, last = path.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
