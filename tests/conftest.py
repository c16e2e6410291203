"""Shared fixtures: a real tokenizer (SmolLM2's, from the offline GGUF) and a tiny random model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One converted copy of the builtin model per machine, shared by tests and the pipeline.
os.environ.setdefault("DPO_PIPELINE_CACHE", str(Path.home() / ".cache" / "dpo-pipeline"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# Files that take minutes start first. With `--dist loadfile` xdist hands whole files to the two
# workers in collection order (given --no-loadscope-reorder: by default it puts the files with the
# most tests first, so the 2-test e2e file, the longest, started last and one worker sat idle for
# minutes at the end). A stable sort after pytest-randomly's shuffle: the seed still fixes the order.
LONGEST_FIRST = (
    "tests/flows/test_worker.py",
    "tests/test_e2e.py",
    "tests/flows/test_cluster_path.py",
    "tests/generation/test_vllm_backend.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return next(
            (i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name.removeprefix("tests/"))),
            len(LONGEST_FIRST),
        )

    items.sort(key=rank)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from pipeline.model.loading import convert_builtin

    return convert_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    from pipeline.model.loading import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir, seed=0)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from pipeline.model.loading import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A second tiny random model: "another model" for scenarios 3 and 4."""
    from pipeline.model.loading import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_other") / "model", smollm2_dir, seed=1)
