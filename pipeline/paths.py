"""Where stages read and write (the same paths appear in dvc.yaml)."""

PROMPTS = "data/prompts.parquet"
QUARANTINE = "data/quarantine.jsonl"
POLICY_DIR = "models/policy"
POLICY_GENERATIONS = "data/policy/generations.parquet"
CANDIDATES = "data/candidates.parquet"
CANDIDATES_OTHER = "data/candidates_other.parquet"
SCORES = "data/judge/scores.parquet"
SELECTIONS = "data/judge/selections.parquet"
PAIRS = "data/pairs.parquet"
REFERENCE = "data/reference.parquet"
METRICS = "metrics"


def model_dir(variant: str) -> str:
    return f"models/{variant}"


def live_dir(variant: str) -> str:
    return f"dvclive/train/{variant}"


def eval_table(variant: str) -> str:
    return f"data/eval/{variant}/pairs.parquet"


def eval_generations(variant: str) -> str:
    return f"data/eval/{variant}/generations.parquet"


def metrics_file(stage: str) -> str:
    return f"{METRICS}/{stage}.json"


def candidates(source: str) -> str:
    """The policy's candidates, or another model's (scenarios 3 and 4)."""
    return {"policy": CANDIDATES, "other": CANDIDATES_OTHER}[source]
