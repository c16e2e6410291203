"""The real `dvc repro` on a tiny config (tiny random model, a handful of prompts) in a temporary git
repo: all outputs appear, a second repro does nothing, and a params change reruns only what it must."""

from __future__ import annotations

import os
import sys

import polars as pl
import pytest
import torch
from huggingface_hub import ModelCard
from repo_utils import PROJECT, copy_repo, make_repo, ran, run, set_param, tiny_params
from transformers import AutoModelForCausalLM

from pipeline import preload, stage_deps
from pipeline.settings.params import Params


def stages_importing(module: str) -> set[str]:
    """Stages (foreach expanded) whose code imports ``module``, by the import walk of pipeline.stage_deps."""
    out = set()
    for name, (mod, _) in stage_deps.stage_modules(PROJECT / "dvc.yaml").items():
        if module in stage_deps.closure(mod):
            out |= {s for s in ALL if s == name or s.startswith(name + "@")}
    return out


ALL = {
    "prepare",
    "policy",
    "sample",
    "sample_other",
    "judge",
    "pairs",
    "reference",
    "train@dpo",
    "train@dpop",
    "evaluate@dpo",
    "evaluate@dpop",
    "export@dpo",
    "export@dpop",
    "report",
    "toy",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, other_tiny_model_dir):
    """The tiny config reproduced once (the module's tests share this run, never its folder)."""
    repo = make_repo(tmp_path_factory.mktemp("e2e"), tiny_params(tiny_model_dir, other_tiny_model_dir))
    return repo, run(["dvc", "repro"], repo)


@pytest.fixture
def repo(built, tmp_path):
    """A private copy of the reproduced repo: each test changes its own."""
    return copy_repo(built[0], tmp_path / "repo")


def test_dvc_repro_end_to_end_and_reruns(built, repo):
    out = built[1]
    assert ran(out) == ALL, out[-3000:]
    # on a CPU the train stage re-executes itself on tcmalloc (train.runtime.cpu_allocator), where installed
    installed = os.path.isfile(os.path.join(sys.prefix, "lib", preload.TCMALLOC))
    assert out.count("(train.runtime.cpu_allocator: tcmalloc)") == (2 if installed else 0)

    # Outputs of every stage, valid against their schemas
    from pipeline.io import read_json, read_table

    prompts = read_table(repo / "data/prompts.parquet", "prompts")
    assert prompts.group_by("split").len().sort("split").rows() == [("test", 4), ("train", 10), ("warmup", 4)]
    cands = read_table(repo / "data/candidates.parquet", "candidates")
    assert len(cands) == 30 and set(cands["candidate_idx"]) == {0, 1, 2}
    pairs = read_table(repo / "data/pairs.parquet", "pairs")
    assert len(pairs) > 0 and set(pairs["scenario"]) == {2} and set(pairs["chosen_source"]) == {"gold"}
    assert set(pairs["split"]) == {"train", "heldout"}
    ref = read_table(repo / "data/reference.parquet", "reference")
    assert ref["pair_id"].to_list() == pairs["pair_id"].to_list() and (ref["ref_w"] < 0).all()
    for v in ("dpo", "dpop"):
        assert (repo / f"models/{v}/config.json").is_file()
        ev = read_json(repo / f"metrics/eval/{v}.json")
        assert 0 <= ev["test_accuracy"] <= 1 and ev["heldout"]["n_pairs"] == int((pairs["split"] == "heldout").sum())
        lp_w = pl.read_csv(repo / f"dvclive/train/{v}/plots/metrics/lp_w.tsv", separator="\t")
        assert len(lp_w) >= 1 and lp_w["lp_w"].is_finite().all()
        # the exported Hugging Face folder: its card records the variant's settings and its evaluation
        card = ModelCard.load(repo / f"export/models/{v}/README.md").data.to_dict()["dpo_pipeline"]
        assert card["hyperparameters"] == Params.load(repo / "params.yaml").train.variants[v].settings.model_dump()
        assert card["losses"][0]["name"] == v and card["evaluation"] == ev
    report = (repo / "reports/main/report.md").read_text()
    assert "| dpo |" in report and "| dpop |" in report and (repo / "reports/main/logprobs.png").is_file()
    assert "dpop" in run(["dvc", "plots", "show", "--json"], repo)

    ids = torch.tensor([[1, 42, 7, 99, 3]])
    with torch.no_grad():
        assert torch.equal(
            *(
                AutoModelForCausalLM.from_pretrained(repo / d).eval()(ids).logits
                for d in ("models/dpo", "export/models/dpo")
            )
        )

    # Nothing changed: nothing reruns
    assert ran(run(["dvc", "repro"], repo)) == set()

    # The flows' settings, in params.yaml and in code, are no stage's: changing them reruns nothing
    set_param(repo, "flows.log_tail_lines", 99)
    set_param(repo, "flows.study.seeds", [7, 8])
    with (repo / "pipeline/flows/settings.py").open("a") as f:
        f.write("\n# an edit to the flow settings' code\n")
    assert ran(run(["dvc", "repro"], repo)) == set()

    # Editing one module reruns exactly the stages whose code imports it (their outputs are the same,
    # so nothing downstream of them reruns for it)
    for module in ("pipeline/analysis/report.py", "pipeline/analysis/heldout.py"):
        expected = stages_importing(module)
        assert expected and expected != ALL, (module, expected)
        with (repo / module).open("a") as f:
            f.write("\n# an edit that changes no behaviour\n")
        assert ran(run(["dvc", "repro"], repo)) == expected, module
    assert ran(run(["dvc", "repro"], repo)) == set()

    # scenario 4: the other model is sampled (it was an empty table), judged, and rejects are its samples
    assert len(read_table(repo / "data/candidates_other.parquet", "candidates")) == 0
    set_param(repo, "pairs.scenario", 4)
    assert ran(run(["dvc", "repro", "pairs"], repo)) == {"sample_other", "judge", "pairs"}
    other = read_table(repo / "data/candidates_other.parquet", "candidates")
    assert len(other) == 10 * 2 and set(other["source"]) == {"other"}
    pairs = read_table(repo / "data/pairs.parquet", "pairs")
    assert len(pairs) > 0 and set(pairs["rejected_source"]) == {"other"} and set(pairs["scenario"]) == {4}
    assert all(
        r["rejected_text"] in set(other.filter(pl.col("prompt_id") == r["prompt_id"])["text"])
        for r in pairs.iter_rows(named=True)
    )
    pm = read_json(repo / "metrics/pairs.json")
    assert pm["scenario"] == 4 and pm["on_policy"]["rejected_policy_logprob_per_token"] < 0


@pytest.mark.slow
def test_param_changes_rerun_only_what_they_must(repo):
    # beta of one variant: only that variant and what comes after it
    set_param(repo, "train.variants.dpo.beta", 0.3)
    assert ran(run(["dvc", "repro"], repo)) == {"train@dpo", "evaluate@dpo", "export@dpo", "report"}

    # sampling temperature: from sampling on, not before
    set_param(repo, "sample.temperature", 1.2)
    again = ran(run(["dvc", "repro"], repo))
    assert {"sample", "judge", "pairs"} <= again <= ALL - {"prepare", "policy", "toy", "sample_other"}


@pytest.mark.slow  # 30 to 90 s on 2 cores (by their load) beyond the repro it starts from
def test_lora_is_one_experiment_away(repo):
    """`dvc exp run -S train.lora.r=16` turns LoRA on: every variant retrains as an adapter (the reference
    stays: a disabled adapter is the base), and evaluation and export take the merged models as they are."""
    from pipeline.io import read_json
    from pipeline.model import card as model_card

    out = run(["dvc", "exp", "run", "-S", "train.lora.r=16"], repo)
    variants = ("dpo", "dpop")
    assert ran(out) == {f"{s}@{v}" for s in ("train", "evaluate", "export") for v in variants} | {"report"}, out[-3000:]
    for v in variants:
        adapter = repo / f"models/{v}/adapter"
        assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
        card = ModelCard.load(repo / f"export/models/{v}/README.md").data.to_dict()[model_card.KEY]
        assert card["adapter"]["r"] == 16 and card["training"]["ref_check"]["passed"]
        assert card["evaluation"] == read_json(repo / f"metrics/eval/{v}.json")
        assert (repo / f"export/models/{v}/adapter/adapter_model.safetensors").is_file()
        AutoModelForCausalLM.from_pretrained(repo / f"export/models/{v}")  # loads without peft
    assert "lora" in run(["dvc", "exp", "show", "--json"], repo)


@pytest.mark.slow  # about as long as the LoRA experiment: both variants retrain
def test_activation_checkpointing_is_one_experiment_away(repo):
    """`dvc exp run -S train.gradient_checkpointing=true` retrains every variant with checkpointed decoder
    layers and reruns only what follows training; the loss curves are the default's and the report reads the
    same (each finding fires as it did)."""
    from pipeline.io import read_json

    variants = ("dpo", "dpop")

    def curves() -> dict[str, list[float]]:
        return {
            v: pl.read_csv(repo / f"dvclive/train/{v}/plots/metrics/loss.tsv", separator="\t")["loss"].to_list()
            for v in variants
        }

    def verdicts() -> list[tuple[str, str, bool]]:
        findings = read_json(repo / "reports/findings.json")["variants"]
        return [(v, f["kind"], f["fired"]) for v in variants for f in findings[v]["findings"]]

    loss, said = curves(), verdicts()
    out = run(["dvc", "exp", "run", "-S", "train.gradient_checkpointing=true"], repo)
    assert ran(out) == {f"{s}@{v}" for s in ("train", "evaluate", "export") for v in variants} | {"report"}, out[-3000:]
    after = curves()
    for v in variants:
        assert len(after[v]) == len(loss[v]) and after[v] == pytest.approx(loss[v], rel=1e-4, abs=1e-5), v
        card = ModelCard.load(repo / f"export/models/{v}/README.md").data.to_dict()["dpo_pipeline"]
        assert card["hyperparameters"]["gradient_checkpointing"] is True
    assert verdicts() == said
