"""Training across two machines, on loopback: two clones of one bare git repository act as two machines, a local
folder is their DVC remote, gloo joins them. The leader runs ``dvc exp run train@dpo`` with 1 process, the
follower ``python -m pipeline.training.follow --variant dpo --pull`` with 2 (so a tail batch has fewer pairs
than ranks); each machine's settings come from its environment (``DPO_TRAIN_*``), as on a cluster.

The 3-process run reproduces the 1-process loss curve (DDP and FSDP2) and the leader's experiment records it;
the follower writes nothing; a follower killed mid-run fails the run with a message that names it, and the
rerun resumes from the leader's checkpoint to the same curve; a follower on another commit is refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml
from repo_utils import make_repo, run, tiny_params

from pipeline.flows.experiments import experiments

pytestmark = pytest.mark.slow

VARIANT = "dpo"
STAGE = f"train@{VARIANT}"
UPSTREAM = "reference"  # with everything upstream of it: every input of train@dpo
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def multinode_params(model_dir: Path, other_dir: Path) -> dict:
    p = tiny_params(model_dir, other_dir)
    p["train"].update(
        # fp32: the curves are compared to 1e-4 (under bf16 each rank's gradient sum is rounded before the
        # all-reduce); batches of 4 pairs, 2 micro-batches, each epoch's short tail kept: on 3 ranks some
        # micro-batches hold no pair and run a zero-weight padding row
        bf16=False,
        lr=1e-3,
        epochs=4,
        batch_size=4,
        grad_accum=2,
        tail="keep",
        eval_every=2,
        probe_every=0,
        variants={VARIANT: {"loss": "dpo", "beta": 0.5}},
    )
    p["train"]["runtime"].update(backend="gloo", checkpoint_every=2, rdzv_timeout=180)
    return p


@dataclass(frozen=True)
class Origin:
    bare: Path  # what every machine clones
    remote: Path  # the DVC remote: the upstream stages' outputs and run-cache
    loss: list[float]  # train@dpo's loss curve in one process


def clone(origin: Origin, dest: Path) -> Path:
    run(["git", "clone", "-q", "-b", "main", origin.bare.as_uri(), str(dest)], dest.parent)
    run(["dvc", "remote", "add", "--local", "--default", "shared", str(origin.remote)], dest)
    return dest


def curve(root: Path, name: str = "loss") -> list[float]:
    return pl.read_csv(root / f"dvclive/train/{VARIANT}/plots/metrics/{name}.tsv", separator="\t")[name].to_list()


@pytest.fixture(scope="module")
def origin(tmp_path_factory, tiny_model_dir, other_tiny_model_dir) -> Origin:
    """The repository in a bare origin; one machine computed the stages upstream of train@dpo, committed their
    dvc.lock and metrics and pushed their outputs (with the run-cache) to the remote, then trained train@dpo in
    one process (neither committed nor pushed: the leaders below must train it, not restore it)."""
    root = tmp_path_factory.mktemp("multinode")
    repo = make_repo(root, multinode_params(tiny_model_dir, other_tiny_model_dir))
    bare, remote = root / "origin.git", root / "dvc-remote"
    remote.mkdir()
    run(["git", "init", "-q", "--bare", str(bare)], root)
    run(["git", "push", "-q", str(bare), "HEAD:refs/heads/main"], repo)
    o = Origin(bare, remote, [])
    first = clone(o, root / "first")
    run(["dvc", "repro", UPSTREAM], first)
    run(["dvc", "push", "--run-cache"], first)
    run(["git", "add", "-A"], first)
    run([*GIT, "commit", "-qm", "the stages upstream of train"], first)
    run(["git", "push", "-q", "origin", "HEAD:main"], first)
    run(["dvc", "repro", "--single-item", STAGE], first)
    return Origin(bare, remote, curve(first))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_env(root: Path, nproc: int, port: int) -> dict[str, str]:
    """One machine's environment: its processes, the run's size and where the leader listens."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "DPO_LOG_LEVEL": "INFO",
        "DPO_TRAIN_NNODES": "2",
        "DPO_TRAIN_NPROC": str(nproc),
        "DPO_TRAIN_RDZV_ENDPOINT": f"127.0.0.1:{port}",
    }


@dataclass
class Machines:
    leader: Path
    follower: Path

    def start(self, name: str, logs: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
        """The follower joins (after restoring its inputs), the leader runs the stage as experiment ``name``."""
        port = free_port()
        follower = subprocess.Popen(
            [sys.executable, "-m", "pipeline.training.follow", "--variant", VARIANT, "--pull"],
            cwd=self.follower,
            env=machine_env(self.follower, 2, port),
            stdout=(logs / f"{name}-follower.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        script = f"dvc pull --run-cache --allow-missing && dvc exp run --pull -n {name} {STAGE}"
        leader = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.leader,
            env=machine_env(self.leader, 1, port),
            stdout=(logs / f"{name}-leader.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        return leader, follower


def finish(procs: tuple[subprocess.Popen, subprocess.Popen], name: str, logs: Path) -> tuple[int, int, str]:
    leader, follower = procs
    rc_l, rc_f = leader.wait(timeout=900), follower.wait(timeout=120)
    text = "".join(f"--- {m}\n{(logs / f'{name}-{m}.log').read_text()[-6000:]}\n" for m in ("leader", "follower"))
    return rc_l, rc_f, text


def machines(origin: Origin, tmp_path: Path) -> Machines:
    return Machines(clone(origin, tmp_path / "leader"), clone(origin, tmp_path / "follower"))


def written_by_training(root: Path) -> list[str]:
    places = [f"models/{VARIANT}", "dvclive/train", f"data/train/{VARIANT}", ".cache/checkpoints"]
    return [p for p in places if (root / p).exists() and any(f.is_file() for f in (root / p).rglob("*"))]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_machines_reproduce_the_one_process_curve(origin, tmp_path, strategy):
    m = machines(origin, tmp_path)
    for root in (m.leader, m.follower):  # a runtime setting every machine must share: in both checkouts
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"]["runtime"]["strategy"] = strategy
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rc_l, rc_f, logs = finish(m.start("two-machines", tmp_path), "two-machines", tmp_path)
    assert rc_l == 0 and rc_f == 0, logs
    assert f"{VARIANT}: " in logs and "on 3 process(es)" in logs, logs

    loss = curve(m.leader)
    assert len(loss) == len(origin.loss) >= 8
    assert max(abs(a - b) for a, b in zip(loss, origin.loss)) < 1e-4, (loss, origin.loss)
    exp = {e["name"]: e for e in experiments(m.leader)}["two-machines"]
    assert exp["metrics"][f"dvclive/train/{VARIANT}/metrics.json:loss"] == pytest.approx(loss[-1], abs=1e-6)
    assert json.loads((m.leader / f"models/{VARIANT}/pipeline.json").read_text())["world_size"] == 3
    # the leader alone wrote; the follower only restored the inputs
    assert written_by_training(m.follower) == []
    assert (m.follower / "data/reference.parquet").is_file()
    assert (m.leader / f"models/{VARIANT}/model.safetensors").is_file()


def kill_machine(proc: subprocess.Popen) -> None:
    """Every process of a machine's run, as when it goes away: the follower command, its torchrun, the workers
    (torchrun starts them in sessions of their own)."""
    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_a_lost_follower_fails_the_run_naming_it_and_the_rerun_resumes(origin, tmp_path):
    m = machines(origin, tmp_path)
    leader, follower = procs = m.start("cut", tmp_path)
    checkpoints = m.leader / ".cache/checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and leader.poll() is None and not list(checkpoints.glob(f"{VARIANT}-*.pt")):
        time.sleep(0.05)
    assert leader.poll() is None, finish(procs, "cut", tmp_path)[2]
    time.sleep(0.3)  # past the checkpoint: the rerun must redo what the kill lost
    kill_machine(follower)
    rc_l, _, logs = finish(procs, "cut", tmp_path)
    assert rc_l != 0, logs
    assert "NodeLost: lost follower node" in logs and "(ranks 1-2) during training" in logs, logs
    assert not (m.leader / f"models/{VARIANT}").exists()

    rc_l, rc_f, logs = finish(m.start("resumed", tmp_path), "resumed", tmp_path)
    assert rc_l == 0 and rc_f == 0, logs
    assert "resuming from checkpoint" in logs, logs
    assert max(abs(a - b) for a, b in zip(curve(m.leader), origin.loss)) < 1e-4
    assert len(curve(m.leader)) == len(origin.loss)
    assert "resumed" in {e["name"] for e in experiments(m.leader)}
    assert not list(checkpoints.glob("*.pt"))  # removed after the run


def test_a_follower_on_another_commit_is_refused(origin, tmp_path):
    m = machines(origin, tmp_path)
    losses = m.follower / "pipeline/training/losses.py"
    losses.write_text(losses.read_text() + "\n# a change the leader does not have\n")
    run([*GIT, "commit", "-qam", "a follower's own change"], m.follower)
    rc_l, rc_f, logs = finish(m.start("refused", tmp_path), "refused", tmp_path)
    assert rc_l != 0 and rc_f != 0, logs
    assert "NodesDiffer: machines of this run differ from the leader" in logs, logs
    assert "follower node" in logs and "git commit" in logs and "pipeline/training/losses.py differs" in logs, logs
    assert written_by_training(m.leader) == [] and written_by_training(m.follower) == []
