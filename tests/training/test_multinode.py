"""Training across machines, piece by piece: this machine's runtime from the environment, the torchrun command
of the leader and of a follower, the leader-first rank order and the fingerprint check (two gloo processes
as two machines), and naming the machine a failed collective lost. The whole run on loopback is in
test_multinode_loopback.py (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from repo_utils import PROJECT, repo_params

from pipeline.settings.base import ConfigError
from pipeline.settings.params import Params
from pipeline.settings.train import RuntimeParams
from pipeline.training import distributed, multinode, node_check, node_watch
from pipeline.training.multinode import Node, Nodes

RUNTIME = RuntimeParams(**repo_params()["train"]["runtime"])


def test_environment_overrides_this_machines_runtime():
    assert multinode.node_runtime(RUNTIME, {}) is RUNTIME
    env = {"DPO_TRAIN_NNODES": "4", "DPO_TRAIN_NPROC": "8", "DPO_TRAIN_RDZV_ENDPOINT": "node-0.svc:29500"}
    rt = multinode.node_runtime(RUNTIME, {**env, "DPO_TRAIN_RDZV_ID": "run-7", "OTHER": "x"})
    assert (rt.nnodes, rt.nproc, rt.rdzv_endpoint, rt.rdzv_id) == (4, 8, "node-0.svc:29500", "run-7")
    assert rt.strategy == RUNTIME.strategy and rt.checkpoint_dir == RUNTIME.checkpoint_dir
    with pytest.raises(ConfigError, match=r"DPO_TRAIN_NNODES='zero'.*train\.runtime\.nnodes"):
        multinode.node_runtime(RUNTIME, {"DPO_TRAIN_NNODES": "zero"})
    with pytest.raises(ConfigError, match=r"DPO_TRAIN_RDZV_ENDPOINT='node-0'.*train\.runtime\.rdzv_endpoint"):
        multinode.node_runtime(RUNTIME, {"DPO_TRAIN_RDZV_ENDPOINT": "node-0"})


@pytest.mark.parametrize(
    "key,value", [("nnodes", 0), ("rdzv_endpoint", "no-port"), ("rdzv_id", "-bad id"), ("rdzv_timeout", 0)]
)
def test_runtime_settings_are_validated_naming_the_key(key, value):
    raw = repo_params({"train": {"runtime": {key: value}}})
    with pytest.raises(ConfigError, match=rf"train\.runtime\.{key}"):
        Params.parse(raw)


def test_torchrun_command_of_one_machine_and_of_leader_and_follower():
    one = multinode.torchrun_command(RUNTIME.model_copy(update={"nproc": 2}), "leader", "stages.train", ["--x"])
    assert one[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "stages.train", "--x"]
    rt = RUNTIME.model_copy(update={"nnodes": 3, "rdzv_endpoint": "10.0.0.5:29400", "rdzv_id": "r1"})
    lead = multinode.torchrun_command(rt, "leader", "stages.train", ["--variant", "dpo"])
    follow = multinode.torchrun_command(rt, "follower", "stages.train", ["--variant", "dpo"])
    for cmd, host, role in ((lead, 1, "leader"), (follow, 0, "follower")):
        assert "--standalone" not in cmd and cmd[-3:] == ["stages.train", "--variant", "dpo"]
        assert {
            "--nnodes=3",
            "--rdzv-backend=c10d",
            "--rdzv-endpoint=10.0.0.5:29400",
            "--rdzv-id=r1",
            f"--rdzv-conf=is_host={host},join_timeout={rt.rdzv_timeout},read_timeout={rt.rdzv_timeout}",
            f"--role={role}",
            "--max-restarts=0",
        } <= set(cmd)
    with pytest.raises(ConfigError, match="nnodes is 1"):
        multinode.torchrun_command(RUNTIME, "follower", "stages.train", [])
    with pytest.raises(ValueError, match="role"):
        multinode.torchrun_command(rt, "default", "stages.train", [])


def test_leader_first_order():
    roles = [
        {"role": "follower", "group_rank": 0},
        {"role": "follower", "group_rank": 0},
        {"role": "leader", "group_rank": 1},
        {"role": "follower", "group_rank": 2},
    ]
    assert multinode.leader_first(roles) == [2, 0, 1, 3]
    with pytest.raises(RuntimeError, match="exactly one leader.*found none"):
        multinode.leader_first([{"role": "follower", "group_rank": 0}] * 2)
    with pytest.raises(RuntimeError, match=r"found 2 \(node 0, node 1\)"):
        multinode.leader_first([{"role": "leader", "group_rank": 0}, {"role": "leader", "group_rank": 1}])


def test_a_node_is_named_by_role_host_and_ranks():
    assert str(Node("follower", "gpu-b", 0, tuple(range(8, 16)))) == "follower node 0 on gpu-b (ranks 8-15)"
    assert str(Node("leader", "gpu-a", 1, (0,))) == "leader node 1 on gpu-a (rank 0)"
    assert str(Node("follower", "gpu-c", 2, (3, 5))) == "follower node 2 on gpu-c (ranks 3, 5)"


def test_two_processes_as_two_machines_put_the_leader_first_and_compare_fingerprints(tmp_path):
    """torchrun numbers the follower's process 0; the process group makes the leader's rank 0. A follower
    whose params differ is refused on both, naming it."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # torchrun's, on its machine
    out, root = tmp_path / "seen", tmp_path / "checkout"
    (root / "data").mkdir(parents=True)
    (root / "dvc.yaml").write_text((PROJECT / "dvc.yaml").read_text())
    (root / "data" / "pairs.parquet").write_bytes(b"the same pairs")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("multinode_worker.py")), str(store.port), str(out), str(root)],
        env={**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    follower, leader = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1))
    assert (leader["rank"], follower["rank"]) == (0, 1)
    assert (leader["env_rank"], follower["env_rank"]) == ("0", "1")
    host = leader["nodes"][0].split(" on ")[1].split(" ")[0]
    assert (
        leader["nodes"]
        == follower["nodes"]
        == [f"leader node 1 on {host} (rank 0)", f"follower node 0 on {host} (rank 1)"]
    )
    assert leader["error"] == follower["error"]
    assert f"follower node 0 on {host} (rank 1): the params (params.yaml) the stage reads" in leader["error"]
    assert "git commit" not in leader["error"] and "pairs.parquet" not in leader["error"]


def test_fingerprint_names_what_differs(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "data").mkdir(parents=True)
        (root / "dvc.yaml").write_text((PROJECT / "dvc.yaml").read_text())
        (root / "data" / "pairs.parquet").write_bytes(b"pairs")
        (root / "models" / "policy").mkdir(parents=True)
        (root / "models" / "policy" / "config.json").write_text("{}")
    (tmp_path / "b" / "data" / "pairs.parquet").write_bytes(b"other pairs")
    (tmp_path / "b" / "models" / "policy" / "extra.bin").write_bytes(b"x")
    a = node_check.fingerprint("train", {"lr": 1}, tmp_path / "a")
    b = node_check.fingerprint("train", {"lr": 2}, tmp_path / "b")
    assert a["commit"] == b["commit"] == "not a git checkout"
    assert a["data/reference.parquet"] == "missing" and a["models/policy"] != "missing"
    assert a["pipeline/training/trainer.py"] == b["pipeline/training/trainer.py"] == "missing"  # code deps: all listed
    assert node_check.differences(a, a) == []
    assert node_check.differences(a, b) == [
        "the params (params.yaml) the stage reads",
        "data/pairs.parquet differs",
        "models/policy differs",
    ]
    b["commit"], b["data/prompts.parquet"] = "abc123", "missing"
    a["data/prompts.parquet"] = "1234"
    assert node_check.differences(a, b)[:2] == [
        "git commit abc123 (the leader's: not a git checkout)",
        "the params (params.yaml) the stage reads",
    ]
    assert "data/prompts.parquet is missing" in node_check.differences(a, b)


def test_large_files_are_hashed_by_size_and_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(node_check, "WHOLE_FILE_BYTES", 64)
    monkeypatch.setattr(node_check, "EDGE_BYTES", 8)
    f = tmp_path / "w.bin"
    f.write_bytes(bytes(range(100)))
    before = node_check.digest(f)
    f.write_bytes(bytes(range(50)) + b"\xff" + bytes(range(51, 100)))  # the middle only: not read
    assert node_check.digest(f) == before
    f.write_bytes(bytes(range(99)) + b"\xff")  # the last bytes
    assert node_check.digest(f) != before


@pytest.fixture
def two_nodes(monkeypatch):
    """A store like torchrun's and the Nodes of a leader (rank 0) and a follower (rank 1) that hosts it."""
    monkeypatch.setattr(node_watch, "BEAT_S", 0.1)
    monkeypatch.setattr(node_watch, "SETTLE_S", 0.6)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    leader, follower = Node("leader", "a", 1, (0,)), Node("follower", "b", 0, (1,))
    return store, Nodes((leader, follower), "127.0.0.1", store.port, "t")


def beat(nodes: Nodes, rank: int) -> threading.Event:
    stop = threading.Event()
    threading.Thread(target=node_watch._beat, args=(nodes, rank, stop), daemon=True).start()
    return stop


def test_the_machine_whose_processes_stop_beating_is_named(two_nodes):
    _, nodes = two_nodes
    mine = beat(nodes, 0)
    theirs = beat(nodes, 1)
    time.sleep(0.3)
    assert node_watch.lost_nodes(nodes, 0) == ([], True)
    theirs.set()
    time.sleep(0.3)
    assert node_watch.lost_nodes(nodes, 0) == ([nodes.of_rank[1]], True)
    mine.set()


def test_a_failed_collective_becomes_node_lost_and_other_errors_pass(two_nodes):
    _, nodes = two_nodes
    ctx = distributed.Context(rank=0, world=2, nodes=nodes)
    with pytest.raises(node_watch.NodeLost, match=r"lost follower node 0 on b \(rank 1\).*processes stopped") as e:
        with node_watch.watching(ctx):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:4242")
    assert "Connection closed" in str(e.value.__cause__)
    with pytest.raises(ValueError, match="first step"), node_watch.watching(ctx):
        raise ValueError("first step: the policy's log-probs differ")
    theirs = beat(nodes, 1)
    with pytest.raises(RuntimeError, match="a bug") as e2, node_watch.watching(ctx):
        time.sleep(0.3)
        raise RuntimeError("a bug")  # every machine still beats: the error is its own
    assert not isinstance(e2.value, node_watch.NodeLost)
    theirs.set()


def test_a_store_that_is_gone_names_the_machine_that_hosted_it(two_nodes, monkeypatch):
    store, nodes = two_nodes
    monkeypatch.setattr(node_watch, "STORE_TIMEOUT", node_watch.timedelta(seconds=1))
    gone = Nodes(nodes.of_rank, "127.0.0.1", 1, "t")  # nothing listens on port 1
    assert node_watch.lost_nodes(gone, 0) == ([nodes.of_rank[1]], False)
    assert node_watch.lost_nodes(gone, 1) == ([], False)  # the host itself: nothing to name


def test_follower_refuses_a_run_on_one_machine(tmp_path):
    from pipeline.training import follow

    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    with pytest.raises(SystemExit, match="follower: train.runtime.nnodes is 1"):
        follow.main(["--variant", "dpo", "--params", str(tmp_path / "params.yaml")])
    with pytest.raises(SystemExit, match=r"train\.variants\.nope"):
        follow.main(["--variant", "nope", "--params", str(tmp_path / "params.yaml")])


def test_follower_waits_for_the_leaders_name_to_resolve(monkeypatch):
    import socket

    from pipeline.training import follow

    tries = []

    def resolve(host, port):
        tries.append(host)
        if len(tries) < 3:
            raise socket.gaierror("Name or service not known")
        return [("addr",)]

    monkeypatch.setattr(follow.socket, "getaddrinfo", resolve)
    monkeypatch.setattr(follow.time, "sleep", lambda s: None)
    follow.wait_for_leader("leader-0.run:29400", 60)
    assert tries == ["leader-0.run"] * 3
    monkeypatch.setattr(follow.socket, "getaddrinfo", lambda h, p: (_ for _ in ()).throw(socket.gaierror("nope")))
    with pytest.raises(SystemExit, match=r"leader-0\.run does not resolve after 0 s"):
        follow.wait_for_leader("leader-0.run:29400", 0)
