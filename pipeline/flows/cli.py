"""``python -m pipeline.flows <command>``: run the Prefect flows over the DVC stages from a shell.

Each command imports only what it needs: ``order`` prints the stage order without starting Prefect;
the flow commands start a temporary Prefect server when none is configured, one process at a time
per ``PREFECT_HOME`` (see :mod:`pipeline.flows.server`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml


def _parse_sets(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> ``{"a.b": 1, "c": ["x", "y"]}`` (values parsed as YAML)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        out[key] = yaml.safe_load(value) if value else ""
    return out


def _study_parser(sub) -> None:
    """``study``: seeds x variants x pair sets, or with ``--tune`` the tuning mode."""
    t = sub.add_parser(
        "study",
        help="training seeds x variants x pair sets, one DVC experiment per seed and pair set, "
        "reported with intervals and a row per claim of docs/losses.md (flows.study)",
    )
    t.add_argument(
        "--seeds", type=int, nargs="+", metavar="SEED", help="train.seed values (default: flows.study.seeds)"
    )
    t.add_argument("--variants", nargs="+", metavar="V", help="train variants (default: flows.study.variants)")
    t.add_argument(
        "--scenarios",
        type=int,
        nargs="+",
        choices=(1, 2, 3, 4),
        metavar="K",
        help="pairs.scenario values of judged pairs (default: flows.study.scenarios; none: pairs.source)",
    )
    t.add_argument(
        "-S",
        "--set-param",
        action="append",
        metavar="KEY=VALUE",
        help="params set in every experiment; any -S replaces flows.study.overrides as a whole",
    )
    t.add_argument(
        "--default-size",
        action="store_true",
        help="no flows.study.overrides: every experiment at params.yaml's own sizes",
    )
    t.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild the report from the experiments of the study named -n",
    )
    t.add_argument(
        "--tune",
        action="store_true",
        help="the tuning mode (flows.study.tune): each variant of its grid on one seed, the setting of highest "
        "validation accuracy kept, then the kept settings over the seeds (experiments <name>-tune-<variant>-<i>, "
        "then <name>-d-seed<s>)",
    )
    t.add_argument(
        "--report",
        metavar="DIR",
        help="the report folder (default: flows.study.report, with --tune flows.study.tune.report)",
    )
    t.add_argument("-n", "--name", help="experiment name prefix (experiments <name>-d-seed<s> or <name>-s<k>-seed<s>)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.flows",
        description="Prefect flows over the DVC stages: scheduled runs, sweeps, "
        "on-policy rounds, GPU-cluster deployment.",
    )
    p.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the pipeline flow (one task per DVC stage)")
    r.add_argument("-S", "--set-param", action="append", metavar="KEY=VALUE", help="param override (repeatable)")
    r.add_argument("targets", nargs="*", help="stages to reproduce with their upstream (default: all)")
    r.add_argument("-n", "--name", help="DVC experiment name")
    s = sub.add_parser("sweep", help="a grid of DVC experiments")
    s.add_argument(
        "-G", "--grid", action="append", metavar="KEY=[V1,V2]", help="a grid axis (default: flows.sweep.grid)"
    )
    s.add_argument("-j", "--max-parallel", type=int)
    s.add_argument("-n", "--name")
    s.add_argument("targets", nargs="*")
    c = sub.add_parser("scenarios", help="one DVC experiment per pairs.scenario for one loss, side by side")
    c.add_argument("--variant", help="the train variant (loss) compared (default: flows.scenarios.variant)")
    c.add_argument(
        "--list",
        dest="scenarios",
        type=int,
        nargs="+",
        choices=(1, 2, 3, 4),
        metavar="K",
        help="scenarios to run, e.g. --list 1 3 (default: flows.scenarios.list)",
    )
    c.add_argument("-n", "--name", help="experiment name prefix (experiments <name>-s<k>)")
    _study_parser(sub)
    o = sub.add_parser("rounds", help="on-policy rounds (iterative DPO)")
    o.add_argument("-R", "--rounds", type=int)
    o.add_argument("--variant")
    o.add_argument("-S", "--set-param", action="append", metavar="KEY=VALUE")
    o.add_argument("-n", "--name")
    sub.add_parser("order", help="print the stages in dvc dag order")
    _add_kubernetes(sub)
    return p


def _add_kubernetes(sub) -> None:
    """The Kubernetes commands: the work pool's job template, and train stages across machines as JobSets."""
    k = sub.add_parser(
        "k8s-template",
        help="print the Kubernetes work pool's base job template (variable gpu_count: the pod's nvidia.com/gpu limit)",
    )
    k.add_argument(
        "--gpus", type=int, default=0, help="GPUs of pods whose deployment sets no gpu_count (default 0: no GPU limit)"
    )
    m = sub.add_parser(
        "multinode",
        help="train@<variant> stages across machines, a Kubernetes JobSet each (with your kubeconfig)",
    )
    m.add_argument(
        "--jobset", required=True, type=Path, help="YAML of the JobSet's settings (prefect.yaml's k8s-multinode)"
    )
    m.add_argument("-S", "--set-param", action="append", metavar="KEY=VALUE", help="param override (repeatable)")
    m.add_argument(
        "--print", action="store_true", help="print the JobSets as YAML (kubectl apply -f -); create nothing"
    )
    m.add_argument("targets", nargs="*", help="train stages or the group train (default: every variant)")


def main(argv: list[str] | None = None) -> Any:
    a = parser().parse_args(argv)
    if a.cmd in ("run", "sweep", "scenarios", "study", "rounds"):
        from pipeline.flows.server import start_temporary_server

        start_temporary_server()
    if a.cmd == "run":
        from pipeline.flows import run

        res = run.pipeline_flow(
            overrides=_parse_sets(a.set_param) or None, targets=a.targets or None, experiment=a.name, repo=a.repo
        )
    elif a.cmd == "sweep":
        from pipeline.flows import sweep

        grid = _parse_sets(a.grid) or None
        if grid and not all(isinstance(v, list) for v in grid.values()):
            raise SystemExit("each --grid value must be a list, e.g. train.variants.dpo.beta=[0.1,0.3]")
        res = sweep.sweep_flow(
            grid=grid, max_parallel=a.max_parallel, targets=a.targets or None, name=a.name, repo=a.repo
        )
        print(res["markdown"])
        return res
    elif a.cmd == "scenarios":
        from pipeline.flows import scenarios

        res = scenarios.scenarios_flow(scenarios=a.scenarios, variant=a.variant, name=a.name, repo=a.repo)
        print(res["markdown"])
        return res
    elif a.cmd == "study":
        from pipeline.flows import study

        if a.default_size and a.set_param:
            raise SystemExit("--default-size and -S exclude each other: -S already replaces flows.study.overrides")
        overrides = {} if a.default_size else _parse_sets(a.set_param) if a.set_param else None
        if a.report_only and not a.name:
            raise SystemExit("--report-only needs the study's name (-n NAME)")
        kw: dict[str, Any] = {"report_only": True} if a.report_only else {}
        if a.report:
            kw["report"] = a.report
        if a.tune:
            if a.variants or a.scenarios:
                raise SystemExit("--tune takes its variants from flows.study.tune.grid and runs no scenarios")
            from pipeline.flows import tuning

            res = tuning.tuning_flow(seeds=a.seeds, overrides=overrides, name=a.name, repo=a.repo, **kw)
        else:
            res = study.study_flow(
                seeds=a.seeds,
                variants=a.variants,
                scenarios=a.scenarios,
                overrides=overrides,
                name=a.name,
                repo=a.repo,
                **kw,
            )
        print(res["markdown"])
        return res
    elif a.cmd == "rounds":
        from pipeline.flows import rounds

        res = rounds.rounds_flow(
            rounds=a.rounds, variant=a.variant, overrides=_parse_sets(a.set_param) or None, name=a.name, repo=a.repo
        )
        print(Path(res["report"]).read_text())
        return res
    elif a.cmd == "multinode":
        return _multinode(a)
    elif a.cmd == "order":
        from pipeline.flows.dag import stage_order

        print("\n".join(stage_order(a.repo)))
        return None
    else:
        from pipeline.flows.cluster import kubernetes_job_template

        print(json.dumps(kubernetes_job_template(a.gpus), indent=2))
        return None
    print(json.dumps(res, indent=2, default=str))
    return res


def _multinode(a: argparse.Namespace) -> Any:
    """``multinode``: the flow, or with ``--print`` the JobSets it would create (no Prefect, no cluster)."""
    from pipeline.flows.jobset import JobSetSettings

    settings = JobSetSettings(**yaml.safe_load(a.jobset.read_text(encoding="utf-8")))
    overrides = _parse_sets(a.set_param) or None
    if a.print:
        from pipeline.flows.jobset import jobset_manifest, jobset_name
        from pipeline.flows.multinode import git_commit, params_text, train_stages

        root = Path(a.repo).resolve()
        params, commit = params_text(root, overrides), git_commit(root)
        for stage in train_stages(root, a.targets or None):
            variant = stage.split("@", 1)[1]
            manifest = jobset_manifest(
                settings,
                name=jobset_name(variant, "manual"),
                variant=variant,
                commit=commit,
                params_text=params,
                labels={"app.kubernetes.io/part-of": "dpo-pipeline"},
            )
            print("---\n" + yaml.safe_dump(manifest, sort_keys=False), end="")
        return None
    from pipeline.flows import multinode
    from pipeline.flows.server import start_temporary_server

    start_temporary_server()
    res = multinode.multinode_flow(jobset=settings, overrides=overrides, targets=a.targets or None, repo=a.repo)
    print(json.dumps(res, indent=2, default=str))
    return res
