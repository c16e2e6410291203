"""The trainer benchmark's pairs and their reference log-probs, laid out in the steps both trainers take.

The pipeline's own pairs (``data/pairs.parquet``) come with the reference stage's log-probs
(``data/reference.parquet``): those of ``models/policy`` at ``train.bf16``, ``train.shared_prompt`` and
``reference.max_length``. The benchmark trains that model at those settings, so its first step passes
the trainer's reference check exactly as the train stage's does. Pairs without such log-probs
(synthesized ones, another model's, the padded layout of ``ours_padded``) get them here by the reference
stage's own code path (:func:`pair_logprobs`), before and outside the timed runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline import paths
from pipeline.settings.params import Params
from pipeline.settings.prepare import PrepareParams
from pipeline.training.batching import step_batches

PIPELINE, SYNTH = "pipeline", "synth"
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class PairSet:
    pairs: pl.DataFrame  # pair_id, prompt_ids, chosen_ids, rejected_ids
    reference: pl.DataFrame | None  # pair_id, ref_w, ref_l, where a reference file gave them
    source: str  # what the pairs and their log-probs are, for the printout and the JSON


def default_pairs() -> str:
    """The pipeline's own pairs when the pairs stage has run here, else synthesized ones."""
    return PIPELINE if Path(paths.PAIRS).is_file() else SYNTH


def synth_pairs(tokenizer, prepare: PrepareParams, n: int) -> pl.DataFrame:
    """Constructed pairs without sampling: params' reasoning-gym problems with its instruction, the
    gold solution chosen and the same solution with the answer's step changed rejected."""
    from pipeline.data.edits import edit
    from pipeline.data.prompt_text import make_prompt
    from pipeline.data.reasoning_gym_prompts import generate_reasoning_gym
    from pipeline.model.encoding import encode_prompt, encode_response

    source = prepare.reasoning_gym
    rng = random.Random(source.seed)
    rows = []
    for i, problem in enumerate(generate_reasoning_gym(source.task, source.config, source.seed, n)):
        rejected = edit(problem["solution"], "step", problem["answer"], rng)
        if rejected is None:  # a solution without a number to change
            continue
        rows.append(
            {
                "pair_id": f"synth-{i}",
                "prompt_ids": encode_prompt(tokenizer, make_prompt(problem["question"], prepare.instruction)),
                "chosen_ids": encode_response(tokenizer, problem["solution"]),
                "rejected_ids": encode_response(tokenizer, rejected),
            }
        )
    return pl.DataFrame(rows)


def word_pairs(tokenizer, n: int, prompt_tokens: int, response_tokens: int, seed: int) -> pl.DataFrame:
    """``n`` pairs of about ``prompt_tokens`` (the chat template's included) + 2 x ``response_tokens``
    tokens, for sizes the pipeline's pairs do not reach: texts of random whole words of the tokenizer's
    vocabulary, one token each, which TRL's own tokenization of the decoded text gives back unchanged.
    Lengths vary by up to a quarter (prompts) and a third (responses), encoded as the pipeline encodes."""
    import re

    from pipeline.model.encoding import encode_prompt, encode_response

    space = "\u0120"  # byte-level BPE's mark of a leading space
    words = sorted(t for t in tokenizer.get_vocab() if re.fullmatch(f"{space}[a-z]{{3,}}", t))
    if not words:
        raise SystemExit("the tokenizer has no whole-word tokens (byte-level BPE) to build pairs from")
    rng = random.Random(seed)

    def text(n_words: int, spread: int) -> str:
        n_words = max(1, n_words + rng.randrange(-spread, spread + 1))
        return "".join(rng.choice(words) for _ in range(n_words)).replace(space, " ").strip()

    overhead = len(encode_prompt(tokenizer, ""))  # the chat template around an empty user turn
    rows = [
        {
            "pair_id": f"words-{i}",
            "prompt_ids": encode_prompt(tokenizer, text(prompt_tokens - overhead, prompt_tokens // 4)),
            "chosen_ids": encode_response(tokenizer, text(response_tokens - 1, response_tokens // 3)),
            "rejected_ids": encode_response(tokenizer, text(response_tokens - 1, response_tokens // 3)),
        }
        for i in range(n)
    ]
    return pl.DataFrame(rows)


def load_pair_set(
    spec: str, reference: str | None, *, model_path: str, tokenizer, cfg: Params, n_synth: int
) -> PairSet:
    """The pairs ``spec`` names and the reference log-probs that belong to them. ``pipeline``: the
    training pairs of ``data/pairs.parquet`` (those the train stage trains on), with the reference
    stage's log-probs where that stage has run and the model is its model (``models/policy``).
    ``synth``: :func:`synth_pairs`. Else a pairs parquet, with ``reference`` (a parquet of pair_id,
    ref_w, ref_l) when given."""
    if spec == SYNTH:
        return PairSet(
            synth_pairs(tokenizer, cfg.prepare, n_synth),
            None,
            f"synthesized ({n_synth} {cfg.prepare.reasoning_gym.task} problems, step edits)",
        )
    if spec == PIPELINE:
        pairs = pl.read_parquet(paths.PAIRS).filter(pl.col("split") == "train").select("pair_id", *IDS)
        same_model = Path(model_path).resolve() == Path(paths.POLICY_DIR).resolve()
        reference = paths.REFERENCE if same_model and Path(paths.REFERENCE).is_file() else None
        source = f"{paths.PAIRS} ({pairs.height} training pairs)"
    else:
        pairs = pl.read_parquet(spec).select("pair_id", *IDS)
        source = f"{spec} ({pairs.height} pairs)"
    if reference:
        source += f", reference log-probs from {reference}"
        return PairSet(pairs, pl.read_parquet(reference).select("pair_id", "ref_w", "ref_l"), source)
    return PairSet(pairs, None, source)


def check_tokenizer(pairs: pl.DataFrame, tokenizer) -> None:
    top = max(max(max(ids) for ids in pairs[column]) for column in IDS)
    if top >= len(tokenizer):
        raise SystemExit(
            f"pairs hold token id {top} >= the tokenizer's {len(tokenizer)}: they were made with "
            "another tokenizer; pass --pairs synth or the model they were made with"
        )


def reference_logprobs(pair_set: PairSet, model_path: str, cfg: Params, shared_prompt: bool) -> tuple[list, int]:
    """(ref_w, ref_l) of every pair in ``shared_prompt``'s layout, and how many were computed here: the
    reference file's where it has them and the layout is training's, the rest by the reference stage's
    code path on ``model_path`` at params' precision and truncation."""
    pairs = pair_set.pairs
    known: dict[str, tuple[float, float]] = {}
    if pair_set.reference is not None and shared_prompt == cfg.train.shared_prompt:
        known = {row["pair_id"]: (row["ref_w"], row["ref_l"]) for row in pair_set.reference.iter_rows(named=True)}
    todo = pairs.filter(~pl.col("pair_id").is_in(list(known)))
    if todo.height:
        from pipeline.model import loading
        from pipeline.model.logprobs import pair_logprobs

        model = loading.load_model(model_path, cfg.policy.dtype).eval()
        pad_id = loading.load_tokenizer(model_path).pad_token_id
        scoring = cfg.train.model_copy(update={"shared_prompt": shared_prompt})
        ref_w, ref_l, _, _ = pair_logprobs(model, todo, pad_id, cfg.reference.batch_size, scoring)
        known.update(zip(todo["pair_id"], zip(ref_w, ref_l)))
    return [known[pair_id] for pair_id in pairs["pair_id"]], todo.height


def child_pairs(pairs: pl.DataFrame, tokenizer) -> list[dict]:
    """The pairs as a benchmark child takes them: token ids for ours, and for TRL, which tokenizes text
    itself, the chat-templated prompt and the responses (with their EOS) as text."""
    return [
        {
            **{key: list(row[key]) for key in IDS},
            **{text: tokenizer.decode(row[f"{text}_ids"]) for text in ("prompt", "chosen", "rejected")},
        }
        for row in pairs.iter_rows(named=True)
    ]


def step_layout(n_pairs: int, batch_size: int, steps: int, seed: int) -> tuple[list[int], list[int]]:
    """(the pair of each example, the examples in step order): ``steps`` batches of ``batch_size``
    examples cycling through the pairs, ordered as :func:`train_preference` shuffles them, so that TRL,
    reading them in that order, trains on the same pairs in the same steps."""
    examples = [i % n_pairs for i in range(steps * batch_size)]
    order = [i for batch in step_batches(len(examples), batch_size, 1, seed) for i in batch]
    return examples, order
