"""Picking a judge by judge.backend (pipeline/judging/registry.py), with the repository's params.yaml."""

import copy

import pytest
import repo_utils

from pipeline.judging.registry import get_judge
from pipeline.judging.rule import RuleVerifier
from pipeline.settings.base import ConfigError
from pipeline.settings.judge import JudgeParams, LLMJudgeParams
from pipeline.settings.params import Params

KEY = "sk-test-SECRET-7f3a9c1e5b"


@pytest.fixture(scope="module")
def repo_params() -> dict:
    return repo_utils.repo_params()


def test_config_defaults_and_key_never_echoed(repo_params):
    judge = repo_params["judge"]
    assert JudgeParams(**judge).backend == "rule"
    assert isinstance(get_judge("rule", min_gap=judge["min_gap"], llm=LLMJudgeParams(**judge["llm"])), RuleVerifier)
    raw = copy.deepcopy(repo_params)
    raw["judge"].update(backend="llm")
    raw["judge"]["llm"].update(api_key_env=KEY)
    with pytest.raises(ConfigError) as e:
        Params.parse(raw)
    assert "api_key_env" in str(e.value) and KEY not in str(e.value)


def test_llm_backend_needs_its_params_and_unknown_backends_are_named(repo_params):
    with pytest.raises(ValueError, match="judge.llm"):
        get_judge("llm", min_gap=repo_params["judge"]["min_gap"])
    with pytest.raises(ValueError, match="available: rule, llm"):
        get_judge("oracle", min_gap=repo_params["judge"]["min_gap"])
