"""The foreach stages (train, evaluate, export) refuse an unknown ``--variant`` before any work, naming the
key and the variants params.yaml has."""

from __future__ import annotations

import importlib

import pytest
from repo_utils import repo_params, write_params

from pipeline.settings.base import ConfigError


@pytest.mark.parametrize("stage", ["train", "evaluate", "export"])
def test_unknown_variant_is_refused_naming_the_key(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no inputs here: the refusal must come before any is read
    params = write_params(tmp_path / "params.yaml")
    have = sorted(repo_params()["train"]["variants"])
    main = importlib.import_module(f"stages.{stage}").main
    with pytest.raises(ConfigError) as e:
        main(["--params", str(params), "--variant", "nope"])
    assert str(e.value) == f"{params}: train.variants.nope: no such variant (have {have})"
