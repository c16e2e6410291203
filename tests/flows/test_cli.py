"""pipeline/flows/cli.py: ``python -m pipeline.flows <command>`` hands its arguments to the flows."""

from __future__ import annotations

import pytest

from pipeline.flows import cli, server


@pytest.fixture(autouse=True)
def servers(monkeypatch) -> list[str]:
    """The temporary-server starts the commands ask for (none really started: the flows are fakes)."""
    started: list[str] = []
    monkeypatch.setattr(server, "start_temporary_server", lambda: started.append("start"))
    return started


def test_scenarios_command(tmp_path, monkeypatch, capsys):
    # the CLI: python -m pipeline.flows scenarios [--variant V] [--list K ...] [-n NAME]
    from pipeline.flows import scenarios

    calls = []
    monkeypatch.setattr(scenarios, "scenarios_flow", lambda **kw: calls.append(kw) or {"markdown": "| table |"})
    cli.main(["--repo", str(tmp_path), "scenarios", "--variant", "dpop", "--list", "1", "3", "-n", "cmp"])
    cli.main(["scenarios"])
    assert calls == [
        {"scenarios": [1, 3], "variant": "dpop", "name": "cmp", "repo": str(tmp_path)},
        {"scenarios": None, "variant": None, "name": None, "repo": "."},
    ]
    assert "| table |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["scenarios", "--list", "5"])


def test_study_command(tmp_path, monkeypatch, capsys):
    # python -m pipeline.flows study [--seeds S ...] [--variants V ...] [--scenarios K ...] [-S k=v | --default-size]
    from pipeline.flows import study

    calls = []
    monkeypatch.setattr(study, "study_flow", lambda **kw: calls.append(kw) or {"markdown": "| claims |"})
    cli.main(
        [
            "--repo",
            str(tmp_path),
            "study",
            "--seeds",
            "0",
            "1",
            "2",
            "--variants",
            "dpo",
            "-S",
            "prepare.n_test=128",
            "-n",
            "st",
        ]
    )
    cli.main(["study", "--scenarios", "1", "4", "--default-size"])
    cli.main(["study"])
    assert calls == [
        {
            "seeds": [0, 1, 2],
            "variants": ["dpo"],
            "scenarios": None,
            "overrides": {"prepare.n_test": 128},
            "name": "st",
            "repo": str(tmp_path),
        },
        {"seeds": None, "variants": None, "scenarios": [1, 4], "overrides": {}, "name": None, "repo": "."},
        {"seeds": None, "variants": None, "scenarios": None, "overrides": None, "name": None, "repo": "."},
    ]
    assert "| claims |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exclude each other"):
        cli.main(["study", "--default-size", "-S", "prepare.n_test=64"])
    cli.main(["study", "--default-size", "--report-only", "-n", "st"])
    assert calls[-1] == {
        "seeds": None,
        "variants": None,
        "scenarios": None,
        "overrides": {},
        "name": "st",
        "repo": ".",
        "report_only": True,
    }
    with pytest.raises(SystemExit, match="needs the study's name"):
        cli.main(["study", "--report-only"])


def test_order_and_param_commands(tmp_path, monkeypatch, capsys, servers):
    from pipeline.flows import dag, run, sweep

    monkeypatch.setattr(dag, "stage_order", lambda repo: ["prepare", "train@dpo"] if repo == str(tmp_path) else [])
    assert cli.main(["--repo", str(tmp_path), "order"]) is None
    assert capsys.readouterr().out == "prepare\ntrain@dpo\n"
    assert servers == []  # no flow, no server

    calls = []
    monkeypatch.setattr(run, "pipeline_flow", lambda **kw: calls.append(kw) or {"ran": []})
    cli.main(["run", "-S", "train.variants.dpo.beta=0.3", "-S", "pairs.scenario=2", "-n", "b", "evaluate@dpo"])
    assert calls[-1] == {
        "overrides": {"train.variants.dpo.beta": 0.3, "pairs.scenario": 2},
        "targets": ["evaluate@dpo"],
        "experiment": "b",
        "repo": ".",
    }
    monkeypatch.setattr(sweep, "sweep_flow", lambda **kw: calls.append(kw) or {"markdown": ""})
    cli.main(["sweep", "-G", "train.variants.dpo.beta=[0.1,0.3]", "-j", "2"])
    assert calls[-1] == {
        "grid": {"train.variants.dpo.beta": [0.1, 0.3]},
        "max_parallel": 2,
        "targets": None,
        "name": None,
        "repo": ".",
    }
    assert servers == ["start", "start"]  # each flow command starts its server under the lock first
    with pytest.raises(SystemExit, match="must be a list"):
        cli.main(["sweep", "-G", "train.variants.dpo.beta=0.1"])
