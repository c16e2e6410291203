"""The scale page's arithmetic (pipeline/pages/scale_estimate.py) on figures small enough to check by hand, and the
page (pipeline/pages/scale.py): generated from its inputs, stale when the bench it names changes."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from pipeline.pages import build, scale
from pipeline.pages.scale_estimate import estimate, kv_bytes_per_token

ROOT = Path(__file__).resolve().parents[2]

A = {
    "run": {"prompts": 1000, "candidates_per_prompt": 4, "nodes": 2, "gpus_per_node": 4},
    "gpu": {"bf16_dense_flops": 1e15, "hbm_bytes_per_s": 1e12, "memory_bytes": 80e9},
    "policy": {"params": 1e9, "layers": 10, "kv_heads": 2, "head_dim": 50, "dtype_bytes": 2},
    "tokens": {"prompt": 100, "candidate": 200},
    "sampling": {"backend": "vllm", "bench_model_params": 1e8, "gpu_memory_utilization": 0.5},
    "judge": {
        "template_tokens": {"rubric": 50, "listwise": 60, "listwise_item": 10},
        "answer_tokens": 5,
        "output_tokens": {"rubric": 8, "listwise": 20},
        "batch_price_factor": 0.5,
    },
    "training": {"pair_share": 0.5, "heldout_fraction": 0.2, "epochs": 2, "global_batch_pairs": 64, "mfu": 0.5},
    "storage": {"text_bytes_per_token": 4, "candidate_row_fixed_bytes": 70},
}
BENCH = {
    "args": {"max_num_seqs": 100, "dtype": "bfloat16"},
    "results": {"vllm": {"tok_per_s": 1000.0, "startup_s": 60}},
}
PRICE = {"input_per_1k": 0.002, "output_per_1k": 0.01}


def test_sampling_rates_and_times():
    s = estimate(A, BENCH, PRICE)["sampling"]
    assert s["generated_tokens"] == 1000 * 4 * 200
    assert kv_bytes_per_token(A["policy"]) == 2 * 10 * 2 * 50 * 2 == s["kv_bytes_per_token"]
    assert s["rate_scaled"] == pytest.approx(1000 * 0.1)  # the rule: rate × 100 M / 1 B
    # a step of 100 sequences reads 2 GB of weights and 100 × 200 tokens (100 + 200 / 2) × 4 kB at 1 TB/s
    memory = (2e9 + 100 * 200 * 4000) / 1e12
    assert s["step_memory_s"] == pytest.approx(memory)
    assert s["step_compute_s"] == pytest.approx(2e9 * 100 / 1e15)  # less than the reads here
    assert s["rate_roofline"] == pytest.approx(100 / memory)
    assert s["rate_planned"] == pytest.approx(100 / (100 / 1000 + memory))  # the bench's step, then the reads
    assert s["time_planned_s"] == pytest.approx(800_000 / (s["rate_planned"] * 8))
    assert s["chunk_prompts"] == 4 * 100 / 4  # every engine of a node gets a full batch
    assert s["kv_room_bytes"] == pytest.approx(0.5 * 80e9 - 2e9)


def test_a_bench_of_the_policy_itself_is_the_plan():
    a = copy.deepcopy(A)
    a["sampling"]["bench_model_params"] = a["policy"]["params"]
    s = estimate(a, BENCH, PRICE)["sampling"]
    assert s["rate_planned"] == pytest.approx(1000) and s["rate_scaled"] == pytest.approx(1000)


def test_judge_tokens_and_cost_per_mode():
    j = estimate(A, BENCH, PRICE)["judge"]
    rubric, listwise = j["rubric"], j["listwise"]
    assert rubric["requests"] == 4000 and rubric["input_per_request"] == 50 + 100 + 5 + 200
    assert listwise["requests"] == 1000 and listwise["input_per_request"] == 60 + 100 + 5 + 4 * (10 + 200)
    cost = 4000 * 355 / 1000 * 0.002 + 4000 * 8 / 1000 * 0.01
    assert rubric["cost_usd"] == pytest.approx(cost) and rubric["batch_cost_usd"] == pytest.approx(cost / 2)


def test_training_steps_flops_and_time():
    t = estimate(A, BENCH, PRICE)["training"]
    assert t["pairs"] == 500 and t["trained_pairs"] == 400 and t["row_tokens"] == 100 + 2 * 200
    assert t["steps"] == (400 // 64) * 2  # the short last batch dropped
    assert t["tokens"] == 6 * 64 * 500 * 2
    assert t["flops"] == pytest.approx(6 * 1e9 * t["tokens"])
    assert t["time_all_s"] == pytest.approx(t["flops"] / (1e15 * 0.5 * 8))
    assert t["time_node_s"] == pytest.approx(2 * t["time_all_s"])
    assert t["forward_time_one_gpu_s"] == pytest.approx(2 * 1e9 * 500 * 500 / (1e15 * 0.5))


def test_storage():
    s = estimate(A, BENCH, PRICE)["storage"]
    assert s["candidate_row_bytes"] == 70 + 200 * 8 and s["candidates_bytes"] == 4000 * 1670
    assert s["policy_weights_bytes"] == 2e9 and s["policy_checkpoint_bytes"] == 6e9
    assert s["fp32_checkpoint_bytes"] == 12e9 and s["fp32_training_gpu_bytes"] == 16e9


def _copy(dest: Path) -> Path:
    for rel in (scale.ASSUMPTIONS, scale.PARAMS, scale.PAGE):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    bench = json.loads((ROOT / scale.ASSUMPTIONS).read_text())["sampling"]["bench"]
    (dest / "reports/bench").mkdir(parents=True)
    shutil.copy2(ROOT / "reports/bench" / bench, dest / "reports/bench" / bench)
    return dest / "reports/bench" / bench


def test_the_page_follows_the_bench_it_names(tmp_path):
    bench_path = _copy(tmp_path)
    text = scale.scale_page(tmp_path)
    assert text.rstrip("\n") + "\n" == (ROOT / scale.PAGE).read_text()
    data = json.loads(bench_path.read_text())
    data["results"]["vllm"]["tok_per_s"] *= 2
    bench_path.write_text(json.dumps(data))
    assert scale.PAGE in build.stale_pages(tmp_path)
    assert scale.scale_page(tmp_path) != text


def test_a_missing_input_is_named_on_the_page(tmp_path):
    bench_path = _copy(tmp_path)
    bench_path.unlink()
    text = scale.scale_page(tmp_path)
    assert "could not be read" in text and bench_path.name in text
