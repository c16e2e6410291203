"""A stage workspace: a tiny policy folder, prompts and preference pairs in a temporary repository root."""

from __future__ import annotations

import pytest
from repo_utils import write_stage_workspace

from pipeline.model import precision


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_dir):
    """A policy folder, prompts and pairs (train and held-out); train.bf16 (the default) autocasts on CPU
    as it does on a GPU. The current directory is the workspace, as DVC runs a stage."""
    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    write_stage_workspace(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path
