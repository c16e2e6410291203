"""The judge's answer cache (pipeline/judging/cache.py) and where it lives
(:func:`pipeline.paths.resolve_cache_dir` with the judge's ``CACHE_ENV``)."""

import pytest

from pipeline.judging.cache import CACHE_ENV, JudgeCache, cache_key
from pipeline.paths import repo_root, resolve_cache_dir


@pytest.fixture(autouse=True)
def _no_cache_override(monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)


def test_cache_location_env_absolute_relative_and_dvc_exp_workspace(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    exp_ws = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    exp_ws.mkdir(parents=True)
    assert resolve_cache_dir(".cache/judge", env_var=CACHE_ENV, start=repo) == repo.resolve() / ".cache/judge"
    # a `dvc exp run --temp` / queued experiment runs in <repo>/.dvc/tmp/exps/<tmp>: same cache as the repo
    assert repo_root(exp_ws) == repo.resolve()
    assert resolve_cache_dir(".cache/judge", env_var=CACHE_ENV, start=exp_ws) == repo.resolve() / ".cache/judge"
    assert resolve_cache_dir(str(tmp_path / "abs"), env_var=CACHE_ENV, start=exp_ws) == tmp_path / "abs"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert resolve_cache_dir(".cache/judge", env_var=CACHE_ENV, start=exp_ws) == tmp_path / "env"


def test_other_caches_do_not_follow_the_judge_cache_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "judge"))
    assert resolve_cache_dir(".cache/samples", start=tmp_path, env_var=None) == tmp_path.resolve() / ".cache/samples"
    assert resolve_cache_dir(".cache/judge", env_var=CACHE_ENV, start=tmp_path) == tmp_path / "judge"


def test_cache_roundtrip_and_corrupt_entry_is_a_miss(tmp_path):
    c = JudgeCache(tmp_path)
    k = cache_key({"x": 1})
    assert c.get(k) is None
    c.put(k, {"answer": {"score": 4}})
    assert c.get(k)["answer"] == {"score": 4} and c.keys() == [k]
    (tmp_path / k[:2] / f"{k}.json").write_text('{"answer": {"sco')
    assert c.get(k) is None
