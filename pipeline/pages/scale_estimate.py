"""The arithmetic of ``docs/scale.md``: a large run's sampling time, judge tokens and cost, training steps and time,
storage and GPU memory, from a JSON of assumptions, a sampling bench and the judge's price in params.yaml.

Plain functions of their inputs (numbers in, numbers out) so that every figure on the page is computed, none
typed. Units: seconds, bytes, FLOPs, US dollars.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def kv_bytes_per_token(policy: Mapping[str, Any]) -> float:
    """A token's keys and values in every layer, in the policy's dtype."""
    return 2.0 * policy["layers"] * policy["kv_heads"] * policy["head_dim"] * policy["dtype_bytes"]


def sampling(a: Mapping[str, Any], bench: Mapping[str, Any]) -> dict[str, float]:
    """Generated tokens and three per-GPU rates for the policy, from the bench's measured rate on a small model.

    - ``rate_scaled``: the measured rate times (bench model parameters / policy parameters), the rule for a
      decode bound by reading the weights; a pessimistic bound here, since the small model's steps are bound by
      per-step work that does not grow with the parameters;
    - ``rate_roofline``: the batch over the time to read the weights and the batch's keys and values at the
      GPU's memory bandwidth (or to compute, if longer): an optimistic bound with no per-step overhead;
    - ``rate_planned``: the batch over the bench's measured time per step (batch / rate, taking its batch as
      full) plus that memory or compute time: the bench's overhead kept, the policy's reads added (with a bench
      of the policy itself, its measured rate).
    """
    run, gpu, policy, tok = a["run"], a["gpu"], a["policy"], a["tokens"]
    result = bench["results"][a["sampling"]["backend"]]
    batch = float(bench["args"]["max_num_seqs"])
    measured = float(result["tok_per_s"])
    weights = policy["params"] * policy["dtype_bytes"]
    context = tok["prompt"] + tok["candidate"] / 2  # a sequence's mean length while it decodes
    kv = kv_bytes_per_token(policy)
    t_memory = (weights + batch * context * kv) / gpu["hbm_bytes_per_s"]
    t_compute = 2.0 * policy["params"] * batch / gpu["bf16_dense_flops"]
    t_gpu = max(t_memory, t_compute)
    t_bench_step = batch / measured
    # a bench of the policy itself already holds the policy's reads: its rate is the plan
    t_added = t_gpu if a["sampling"]["bench_model_params"] < policy["params"] else 0.0
    gpus = run["nodes"] * run["gpus_per_node"]
    generated = float(run["prompts"] * run["candidates_per_prompt"] * tok["candidate"])
    rates = {
        "rate_scaled": measured * a["sampling"]["bench_model_params"] / policy["params"],
        "rate_planned": batch / (t_bench_step + t_added),
        "rate_roofline": batch / t_gpu,
    }
    kv_room = gpu["memory_bytes"] * a["sampling"]["gpu_memory_utilization"] - weights
    bench_weights = a["sampling"]["bench_model_params"] * DTYPE_BYTES[bench["args"]["dtype"]]
    chunk = run["gpus_per_node"] * batch / run["candidates_per_prompt"]  # prompts: a full batch for every engine
    return {
        "measured_rate": measured,
        "bench_batch": batch,
        "bench_startup_s": float(result["startup_s"]),
        "bench_step_s": t_bench_step,
        "step_memory_s": t_memory,
        "step_compute_s": t_compute,
        "generated_tokens": generated,
        "prefill_tokens": float(run["prompts"] * tok["prompt"]),
        "gpus": float(gpus),
        "weights_bytes": weights,
        "kv_bytes_per_token": kv,
        "kv_room_bytes": kv_room,
        "kv_room_sequences": kv_room / (kv * (tok["prompt"] + tok["candidate"])),
        "bench_weights_read_s": bench_weights / gpu["hbm_bytes_per_s"],
        "chunk_prompts": chunk,
        "chunk_planned_s": chunk
        * run["candidates_per_prompt"]
        * tok["candidate"]
        / (run["gpus_per_node"] * rates["rate_planned"]),
        **rates,
        **{name.replace("rate", "time") + "_s": generated / (rate * gpus) for name, rate in rates.items()},
    }


def judge(a: Mapping[str, Any], price: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Requests, tokens and cost of judging every candidate, per mode: ``rubric`` (one request per candidate)
    and ``listwise`` (one per prompt, its candidates together)."""
    run, tok, j = a["run"], a["tokens"], a["judge"]
    shown = tok["prompt"] + j["answer_tokens"]  # the question and the reference answer
    n = run["candidates_per_prompt"]
    per_request = {
        "rubric": (run["prompts"] * n, j["template_tokens"]["rubric"] + shown + tok["candidate"]),
        "listwise": (
            run["prompts"],
            j["template_tokens"]["listwise"] + shown + n * (j["template_tokens"]["listwise_item"] + tok["candidate"]),
        ),
    }
    out = {}
    for mode, (requests, tokens_in) in per_request.items():
        total_in, total_out = requests * tokens_in, requests * j["output_tokens"][mode]
        cost = total_in / 1000 * price["input_per_1k"] + total_out / 1000 * price["output_per_1k"]
        out[mode] = {
            "requests": float(requests),
            "input_per_request": float(tokens_in),
            "output_per_request": float(j["output_tokens"][mode]),
            "input_tokens": float(total_in),
            "output_tokens": float(total_out),
            "cost_usd": cost,
            "batch_cost_usd": cost * j["batch_price_factor"],
        }
    return out


def training(a: Mapping[str, Any]) -> dict[str, float]:
    """Pairs, tokens, steps, FLOPs (6·N per trained token, 2·N per token of a forward pass) and times at the
    stated MFU: training on every GPU of the run or on one node, and one forward pass over every pair (the
    reference log-probs; the pairs stage's log-probs under the starting policy are another) on one GPU."""
    run, gpu, policy, tok, t = a["run"], a["gpu"], a["policy"], a["tokens"], a["training"]
    pairs = run["prompts"] * t["pair_share"]
    trained = pairs * (1 - t["heldout_fraction"])
    row = tok["prompt"] + 2 * tok["candidate"]  # one row per pair: the prompt once, chosen and rejected after it
    steps_per_epoch = int(trained // t["global_batch_pairs"])  # train.tail: drop
    tokens = steps_per_epoch * t["global_batch_pairs"] * row * t["epochs"]
    flops = 6.0 * policy["params"] * tokens
    forward = 2.0 * policy["params"] * pairs * row
    per_gpu = gpu["bf16_dense_flops"] * t["mfu"]
    gpus = run["nodes"] * run["gpus_per_node"]
    return {
        "pairs": pairs,
        "trained_pairs": trained,
        "row_tokens": float(row),
        "steps": float(steps_per_epoch * t["epochs"]),
        "pairs_per_gpu_step": t["global_batch_pairs"] / gpus,
        "tokens": float(tokens),
        "flops": flops,
        "time_all_s": flops / (per_gpu * gpus),
        "time_node_s": flops / (per_gpu * run["gpus_per_node"]),
        "forward_flops": forward,
        "forward_time_one_gpu_s": forward / per_gpu,
    }


def storage(a: Mapping[str, Any]) -> dict[str, float]:
    """Bytes of the candidates table (uncompressed: Parquet's compression makes the file smaller), and of the
    policy's weights, its AdamW state and a training checkpoint, in ``policy.dtype`` and, for comparison, fp32."""
    run, tok, s, policy = a["run"], a["tokens"], a["storage"], a["policy"]
    row = s["candidate_row_fixed_bytes"] + tok["candidate"] * (s["text_bytes_per_token"] + 4)  # int32 token ids
    rows = run["prompts"] * run["candidates_per_prompt"]
    n = policy["params"]
    out = {"candidate_row_bytes": float(row), "candidate_rows": float(rows), "candidates_bytes": float(row * rows)}
    for name, b in (("policy", policy["dtype_bytes"]), ("fp32", 4)):
        out[f"{name}_weights_bytes"] = n * b
        out[f"{name}_adamw_bytes"] = 2 * n * b  # AdamW's two moments, in the weights' dtype
        out[f"{name}_checkpoint_bytes"] = 3 * n * b  # weights and both moments (the schedule is tiny)
        out[f"{name}_training_gpu_bytes"] = 4 * n * b  # weights, gradients and both moments, sharded
    return out


def estimate(a: Mapping[str, Any], bench: Mapping[str, Any], price: Mapping[str, float]) -> dict[str, Any]:
    return {"sampling": sampling(a, bench), "judge": judge(a, price), "training": training(a), "storage": storage(a)}
