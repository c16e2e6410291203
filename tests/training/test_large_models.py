"""What a policy too large for one device needs, on 2 gloo processes (large_model_worker.py, one launch):
activation checkpointing under DDP and FSDP2, and FSDP2 loading from the meta device with CPU offload.
The FSDP2 policies themselves are unit-tested (mixed precision needs a GPU to run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from repo_utils import repo_params

from pipeline.model import loading
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.model.logprobs import batched_logprobs
from pipeline.settings.train import TrainSettings
from pipeline.training import distributed
from pipeline.training.examples import PairExample
from pipeline.training.trainer import train_preference

PROJECT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("large_model_worker.py")
TERMS = [("dpo", 1.0, {"beta": 0.5})]
# Gradients with and without checkpointing: the same computation, so equal but for rounding (fp32).
GRAD_TOL = 1e-6
# Loss curve and weights of the sharded run against one process: only the order of float sums differs
# (as in test_uneven_steps: 4 AdamW steps of lr 1e-3 move the weights by about 4e-3).
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4


def fsdp_policies(device: str, *, bf16: bool, offload: bool) -> dict:
    ctx = distributed.Context(rank=0, world=2, device=device, strategy="fsdp", offload=offload)
    return distributed.fsdp_policies(ctx, bf16=bf16)


def test_fsdp_policies_follow_the_device_and_settings():
    gpu = fsdp_policies("cuda:0", bf16=True, offload=True)
    mp = gpu["mp_policy"]  # bf16 parameters and compute, gradients reduced in fp32
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert gpu["offload_policy"].pin_memory  # pinned: the copies to the GPU run asynchronously
    # a CPU computes in policy.dtype (its bf16 is autocast); without train.bf16, neither device casts
    assert fsdp_policies("cpu", bf16=True, offload=False) == {}
    assert "mp_policy" not in fsdp_policies("cuda:0", bf16=False, offload=False)
    assert not fsdp_policies("cpu", bf16=False, offload=True)["offload_policy"].pin_memory


@pytest.fixture(scope="module")
def spec(tiny_model_dir) -> dict:
    """8 pairs of varied lengths with the policy's own log-probs as reference; 2 epochs of 2 steps."""
    tok = loading.load_tokenizer(tiny_model_dir)
    model = loading.load_model(tiny_model_dir, "float32").eval()
    ex = []
    for i in range(8):
        p = encode_prompt(tok, f"What is {i} + {i * i}?" + " Think." * (i % 3))
        w = encode_response(tok, f"Answer: {i + i * i}" + " Done." * (i % 2))
        l_ = encode_response(tok, f"Answer: {i + i * i + 1}")
        (rw, rl), _ = batched_logprobs(model, [p, p], [w, l_], tok.pad_token_id, 2)
        ex.append(PairExample(tuple(p), tuple(w), tuple(l_), rw, rl))
    base = {k: v for k, v in repo_params()["train"].items() if k not in ("variants", "runtime")}
    # fp32: bf16 autocast (the default on CPUs with native bf16) rounds each rank's gradient sum before the
    # reduction, far above these tolerances
    settings = TrainSettings(
        **{**base, "lr": 1e-3, "epochs": 2, "batch_size": 4, "grad_accum": 2, "max_length": 64, "bf16": False}
    )
    return {
        "model": str(tiny_model_dir),
        "pad_id": tok.pad_token_id,
        "examples": ex,
        "terms": TERMS,
        "settings": settings,
    }


@pytest.fixture(scope="module")
def two_processes(spec, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("large")
    torch.save(spec, tmp / "spec.pt")
    cmd = [sys.executable, str(WORKER), "2", str(tmp / "spec.pt"), str(tmp / "out.pt")]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-6000:]
    return torch.load(tmp / "out.pt", weights_only=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpointing_keeps_loss_and_gradients_on_two_processes(two_processes, strategy):
    plain, ckpt = two_processes["steps"][strategy, False], two_processes["steps"][strategy, True]
    # grad_accum 2: layer 0 runs once per micro-batch's forward, and with checkpointing again in its backward
    assert (plain["layer_calls"], ckpt["layer_calls"]) == (2, 4)
    assert ckpt["loss"] == pytest.approx(plain["loss"], abs=GRAD_TOL)
    assert plain["grads"].keys() == ckpt["grads"].keys()
    assert max(g.abs().max().item() for g in plain["grads"].values()) > 1e-3  # a real gradient
    for name, g in plain["grads"].items():
        assert torch.allclose(ckpt["grads"][name], g, rtol=0, atol=GRAD_TOL), (strategy, name)


def test_meta_loading_shards_every_parameter_and_only_rank_0_reads(two_processes, spec):
    ranks = two_processes["ranks"]
    assert [r["reads"] for r in ranks] == [[spec["model"]], []]  # rank 1 never reads the checkpoint
    for rank, r in enumerate(ranks):
        for name, p in r["params"].items():
            # a DTensor whose local shard is half the full tensor's first dimension, offloaded to the CPU
            assert p["type"] == "DTensor", (rank, name)
            assert p["local_shape"] == (p["shape"][0] // 2, *p["shape"][1:]), (rank, name, p)
            assert p["device"] == "cpu", (rank, name)
    # every weight arrived whole and the buffers (rotary frequencies, not in the state dict) too
    plain = loading.load_model(spec["model"], "float32")
    sharded = two_processes["sharded"]
    expected = plain.state_dict()
    assert sharded["loaded"].keys() == expected.keys()
    assert all(torch.equal(sharded["loaded"][k], v) for k, v in expected.items())
    buffers = dict(plain.named_buffers())
    assert sharded["buffers"].keys() == buffers.keys() and buffers
    assert all(torch.equal(sharded["buffers"][k], v) for k, v in buffers.items())


def test_meta_loaded_offloaded_run_follows_one_process(two_processes, spec):
    model = loading.load_model(spec["model"], "float32")
    one = train_preference(model, spec["examples"], TERMS, spec["settings"], pad_id=spec["pad_id"])
    sharded = two_processes["sharded"]
    assert len(one) == len(sharded["history"]) == 4
    assert [m["loss"] for m in sharded["history"]] == pytest.approx([m["loss"] for m in one], abs=LOSS_TOL)
    start = loading.load_model(spec["model"], "float32").state_dict()
    trained, expected = sharded["trained"], model.state_dict()
    assert max((expected[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it did train
    assert max((trained[k] - expected[k]).abs().max().item() for k in expected) < WEIGHT_TOL
