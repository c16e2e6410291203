"""``docs/scale.md``: the arithmetic of a large run (sampling, judge, training, storage, pods), rendered from
``docs/scale-assumptions.json``, the sampling bench it names in ``reports/bench/`` and the judge's price in
``params.yaml`` by :mod:`pipeline.pages.scale_estimate`. Every figure on the page is computed; the words around
them say where each input comes from."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.pages.bench import BENCH_DIR
from pipeline.pages.markdown import table
from pipeline.pages.scale_estimate import estimate

PAGE = "docs/scale.md"
ASSUMPTIONS = "docs/scale-assumptions.json"
PARAMS = "params.yaml"


# ------------------------------------------------------------------------------------------------ formats
def millions(x: float) -> str:
    return f"{x / 1e6:,.1f} M" if x < 1e8 else f"{x / 1e6:,.0f} M"


def sci(x: float) -> str:
    """``6.5 × 10^18``."""
    e = math.floor(math.log10(abs(x)))
    return f"{x / 10**e:.2f} × 10^{e}"


def duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB"


def usd(x: float) -> str:
    return f"${x:,.0f}"


def num(x: float) -> str:
    return f"{x:,.0f}"


# ------------------------------------------------------------------------------------------------ sections
def assumptions_section(a: Mapping[str, Any], bench_file: str, price: Mapping[str, float]) -> list[str]:
    run, gpu, p, tok, s, j, t = (a[k] for k in ("run", "gpu", "policy", "tokens", "sampling", "judge", "training"))
    rows = [
        ["run", f"{num(run['prompts'])} prompts × {run['candidates_per_prompt']} candidates; "
         f"{run['nodes']} nodes × {run['gpus_per_node']} GPUs", run["source"]],
        ["GPU", f"{gpu['name']}: {gpu['bf16_dense_flops'] / 1e12:.1f} TFLOPS bf16 dense, "
         f"{gpu['hbm_bytes_per_s'] / 1e12:.2f} TB/s, {gb(gpu['memory_bytes'])}", gpu["source"]],
        ["policy", f"{p['name']}: {p['params'] / 1e9:.2f} B parameters, {p['layers']} layers, {p['kv_heads']} KV "
         f"heads × {p['head_dim']}, {p['dtype']}", p["source"]],
        ["tokens", f"prompt {tok['prompt']}, candidate {tok['candidate']} (mean)", tok["source"]],
        ["sampling bench", f"`{bench_file}` ({s['backend']}), {s['bench_model']}, "
         f"{s['bench_model_params'] / 1e6:.1f} M parameters; gpu_memory_utilization {s['gpu_memory_utilization']}",
         s["source"]],
        ["judge", f"`judge.llm.model`: ${price['input_per_1k'] * 1000:.2f} in, "
         f"${price['output_per_1k'] * 1000:.2f} out per 1M tokens; Batch API × {j['batch_price_factor']}",
         j["source"]],
        ["training", f"{t['pair_share']:.0%} of prompts give a pair, {t['heldout_fraction']:.0%} held out; "
         f"{t['epochs']} epochs of {t['global_batch_pairs']} pairs per step; MFU {t['mfu']:.0%}", t["source"]],
        ["storage", f"{a['storage']['text_bytes_per_token']} bytes of text per token; "
         f"{a['storage']['candidate_row_fixed_bytes']} bytes of fixed columns per row", a["storage"]["source"]],
    ]  # fmt: skip
    return ["## Assumptions", "", *table(["what", "value", "source"], rows), ""]


def sampling_section(a: Mapping[str, Any], e: Mapping[str, float], bench_file: str) -> list[str]:
    run, p, tok = a["run"], a["policy"], a["tokens"]
    gpus = int(e["gpus"])
    rows = [
        [label, num(e[f"rate_{key}"]), duration(e[f"time_{key}_s"]), num(e[f"time_{key}_s"] * gpus / 3600)]
        for key, label in (
            ("scaled", f"bench rate × {a['sampling']['bench_model_params'] / 1e6:.0f} M / {p['params'] / 1e9:.2f} B"),
            ("planned", "bench step time + the 8B's reads (**planning figure**)"),
            ("roofline", "memory roofline, no per-step overhead"),
        )
    ]
    batch = int(e["bench_batch"])
    return [
        "## Sampling",
        "",
        f"Tokens to generate: {num(run['prompts'])} prompts × {run['candidates_per_prompt']} candidates × "
        f"{tok['candidate']} tokens = **{millions(e['generated_tokens'])}**. Prefill is "
        f"{millions(e['prefill_tokens'])} prompt tokens, once per prompt (vLLM's prefix caching shares a prompt's "
        "prefill among its candidates): small next to decoding.",
        "",
        f"The starting figure is measured: {num(e['measured_rate'])} tokens/s on one H100 for "
        f"{a['sampling']['bench_model']} in bf16, vLLM compiled, `max_num_seqs` {batch} "
        f"([`{bench_file}`](../{BENCH_DIR}/{bench_file})). Three ways to carry it to the {p['name']}, all "
        f"estimates, on {gpus} GPUs:",
        "",
        *table(["method", "tokens/s per GPU", f"time on {gpus} GPUs", "GPU-hours"], rows),
        "",
        f"The rule of thumb (rate × parameter ratio) holds for a decode bound by reading the weights; the bench's "
        f"is not. Its step of {batch} sequences took {e['bench_step_s'] * 1000:.1f} ms ({batch} / rate, taking the "
        f"batch as full), while reading its weights takes {e['bench_weights_read_s'] * 1000:.2f} ms: the step is "
        "per-step work (scheduling, sampling, log-probs, detokenising) that does not grow with the parameters, so "
        "the rule overstates the 8B's time. The planning figure keeps the bench's step time and adds the 8B's: reading "
        f"{gb(e['weights_bytes'])} of weights and the batch's keys and values ({batch} sequences × "
        f"{tok['prompt'] + tok['candidate'] / 2:.0f} tokens of mean context × "
        f"{e['kv_bytes_per_token'] / 1e3:.0f} kB) at the GPU's bandwidth takes "
        f"{e['step_memory_s'] * 1000:.1f} ms (the 2·N FLOPs per token take {e['step_compute_s'] * 1000:.1f} ms, "
        "less). Adding the two assumes they do not overlap; the roofline keeps the reads alone. A bench of the "
        "policy itself on one node (`python -m pipeline.bench.sampling`, into `reports/bench/`) settles it: named in "
        f"`{ASSUMPTIONS}` (`sampling.bench`, with the policy's parameter count), its measured rate becomes the "
        "first two rows.",
        "",
        f"Each process starts its engines first: {e['bench_startup_s']:.0f} s for the 135 M model (compilation and "
        "CUDA graphs in the bench); an 8B adds loading its weights.",
        "",
        f"**Chunks.** A worker splits each chunk over its node's {run['gpus_per_node']} engines, so a chunk of "
        f"{run['gpus_per_node']} × {batch} / {run['candidates_per_prompt']} = "
        f"**{num(e['chunk_prompts'])} prompts** (`sample.chunk_size`) gives every engine a full batch; that is "
        f"{math.ceil(run['prompts'] / e['chunk_prompts'])} chunks for {run['nodes']} nodes, each "
        f"{duration(e['chunk_planned_s'])} on a node at the planning rate, so the nodes finish within about one "
        "chunk of each other ([sampling on several machines](sampling.md#sampling-on-several-machines)). The "
        "sampler runs in `policy.dtype`: in float32 it reads twice the bytes per step.",
        "",
        f"**KV cache.** Per engine, {a['sampling']['gpu_memory_utilization']} × {gb(a['gpu']['memory_bytes'])} less "
        f"the weights leaves {gb(e['kv_room_bytes'])}: {num(e['kv_room_sequences'])} sequences at full length "
        f"({tok['prompt'] + tok['candidate']} tokens). A batch of {batch} fits at the mean length; when the cache "
        "fills, vLLM preempts sequences and recomputes them later.",
        "",
    ]


def judge_section(a: Mapping[str, Any], e: Mapping[str, Mapping[str, float]]) -> list[str]:
    j, tok = a["judge"], a["tokens"]
    rows = [
        [
            f"`{mode}`",
            num(r["requests"]),
            num(r["input_per_request"]),
            num(r["output_per_request"]),
            millions(r["input_tokens"]),
            millions(r["output_tokens"]),
            usd(r["cost_usd"]),
            usd(r["batch_cost_usd"]),
        ]
        for mode, r in e.items()
    ]
    t = j["template_tokens"]
    return [
        "## Judge",
        "",
        f"`rubric` sends one request per candidate: its template ({t['rubric']} tokens), the question "
        f"({tok['prompt']}), the reference answer ({j['answer_tokens']}) and the candidate ({tok['candidate']}). "
        f"`listwise` sends one per prompt: its template ({t['listwise']}), the question, the answer and every "
        f"candidate with its frame ({t['listwise_item']} each). Cost at the price of `judge.llm.model` in "
        "`params.yaml`, and "
        "at the Batch API's (`judge.llm.batch: true`):",
        "",
        *table(
            [
                "mode",
                "requests",
                "input tokens each",
                "output each",
                "input tokens",
                "output tokens",
                "cost",
                "Batch API",
            ],
            rows,
        ),  # fmt: skip
        "",
        "`python -m stages.judge --dry-run` prices the real candidates before sending anything "
        "([judge](judge.md)). The rule verifier (`judge.backend: rule`) costs nothing.",
        "",
    ]


def training_section(a: Mapping[str, Any], e: Mapping[str, float]) -> list[str]:
    run, t, tok, gpu = a["run"], a["training"], a["tokens"], a["gpu"]
    gpus = run["nodes"] * run["gpus_per_node"]
    return [
        "## Training",
        "",
        f"- **Pairs**: {num(run['prompts'])} prompts × {t['pair_share']:.0%} = {num(e['pairs'])} (scenario 1: one "
        f"pair per prompt whose best and worst differ), {num(e['trained_pairs'])} trained after "
        f"{t['heldout_fraction']:.0%} held out.",
        f"- **Tokens per pair**: one row per pair, the prompt once and both responses after it "
        f"(`train.shared_prompt`): {tok['prompt']} + 2 × {tok['candidate']} = {num(e['row_tokens'])}; "
        f"{millions(e['tokens'])} trained tokens over {t['epochs']} epochs.",
        f"- **Steps**: {num(e['steps'])} of {t['global_batch_pairs']} pairs (the short last batch of each epoch "
        f"dropped), {e['pairs_per_gpu_step']:g} pairs per GPU per step on {gpus} GPUs.",
        f"- **FLOPs**: 6 · N · tokens = {sci(e['flops'])}. The rule leaves out attention's own FLOPs, a few per "
        f"cent at {num(e['row_tokens'])} tokens.",
        f"- **Time** at {t['mfu']:.0%} MFU of {gpu['bf16_dense_flops'] / 1e12:.1f} TFLOPS: "
        f"**{duration(e['time_all_s'])}** on {gpus} GPUs, {duration(e['time_node_s'])} on one node of "
        f"{run['gpus_per_node']}. With `train.gradient_checkpointing` the GPUs compute 8 · N per token, so "
        f"{t['mfu']:.0%} MFU means {t['mfu'] * 8 / 6:.0%} of the peak busy.",
        f"- **Log-probs of every pair**: the `reference` stage (the reference log-probs) and the `pairs` stage (each "
        f"side's log-prob under the starting policy) each run one forward pass, 2 · N per token = "
        f"{sci(e['forward_flops'])} FLOPs, in one process on one GPU: {duration(e['forward_time_one_gpu_s'])} each "
        "at the same MFU, longer than training itself on the cluster.",
        "",
    ]


def storage_section(a: Mapping[str, Any], e: Mapping[str, float]) -> list[str]:
    tok, s, p = a["tokens"], a["storage"], a["policy"]
    gpus = a["run"]["nodes"] * a["run"]["gpus_per_node"]
    rows = [
        [
            label,
            gb(e[f"{key}_weights_bytes"]),
            gb(e[f"{key}_adamw_bytes"]),
            gb(e[f"{key}_checkpoint_bytes"]),
            f"{gb(e[f'{key}_training_gpu_bytes'])} ({gb(e[f'{key}_training_gpu_bytes'] / gpus)} per GPU)",
        ]
        for key, label in ((("policy", f"{p['dtype']} (`policy.dtype`)"), ("fp32", "float32")))
    ]
    return [
        "## Storage",
        "",
        f"A candidate row holds {s['candidate_row_fixed_bytes']} bytes of fixed columns and, per token, "
        f"{s['text_bytes_per_token']} bytes of text and a 4-byte token id: {num(e['candidate_row_bytes'])} bytes "
        f"at {tok['candidate']} tokens, so {num(e['candidate_rows'])} rows are **{gb(e['candidates_bytes'])}** "
        "uncompressed (Parquet's compression makes the file smaller). The chunk folder holds the same candidates "
        "again, and the DVC cache and remote one copy per version.",
        "",
        "The trainer keeps AdamW's two moments in the weights' dtype (`policy.dtype`), so a checkpoint (weights and "
        "both moments) is three times the weights, and training holds four times the weights on the GPUs (with the "
        "gradients), sharded by FSDP2:",
        "",
        *table(["dtype", "weights", "AdamW state", "checkpoint", f"training state on {gpus} GPUs"], rows),
        "",
        "There is one checkpoint per variant, replaced every `train.runtime.checkpoint_every` steps; the new one "
        "is written beside the old before it replaces it, so the disk holds two while it is written. Each trained "
        "model (`models/<variant>`) and its export add the weights once more. float32, the repository's default "
        "`policy.dtype`, doubles every figure.",
        "",
    ]


def pods_section(a: Mapping[str, Any], e: Mapping[str, Any]) -> list[str]:
    run, s, st, t = a["run"], e["sampling"], e["storage"], e["training"]
    gpus, node = run["nodes"] * run["gpus_per_node"], run["gpus_per_node"]
    weights, cands, state = gb(st["policy_weights_bytes"]), gb(st["candidates_bytes"]), st["policy_training_gpu_bytes"]
    checkpoint = st["policy_checkpoint_bytes"]
    rows = [
        ["`sample` and its workers", f"{run['nodes']} × {node}, one vLLM engine per GPU",
         f"{weights} of weights + the KV cache, {a['sampling']['gpu_memory_utilization']} of the GPU in all",
         f"at least the weights ({weights}) as they load",
         f"the model ({weights}); the shared chunk folder (ReadWriteMany) ≥ {cands}"],
        ["`judge` (an API)", "1 CPU pod", "none", f"the candidates table, about {cands}",
         "the candidates and the answer cache"],
        ["`pairs`, `reference`", "1 × 1 each", f"{weights} of weights + one batch's activations", "the weights",
         "the model and the pairs"],
        ["`train@<variant>`", f"{run['nodes']} × {node}",
         f"{gb(state / gpus)} of sharded training state + activations ({t['pairs_per_gpu_step']:g} pairs × "
         f"{num(t['row_tokens'])} tokens per step)",
         f"rank 0 gathers a checkpoint's full state ({gb(checkpoint)}), and the weights twice for the final save",
         f"two checkpoints while one is replaced ({gb(2 * checkpoint)}) + the model ({weights})"],
        ["`evaluate@<variant>`", "1 × 1, vLLM greedy", f"{weights} of weights + the KV cache", "the weights",
         "the model"],
    ]  # fmt: skip
    return [
        "## Pods",
        "",
        *table(["stage", "pods × GPUs", "GPU memory", "host memory", "disk"], rows),
        "",
        f"The whole training state fits one node ({gb(state / node)} per GPU on {node}): the {run['nodes']} nodes "
        f"buy time ({duration(t['time_node_s'])} → {duration(t['time_all_s'])}), not memory. GPU-hours: sampling "
        f"{s['time_planned_s'] * s['gpus'] / 3600:.1f} at the planning rate "
        f"({num(s['time_scaled_s'] * s['gpus'] / 3600)} by the rule of thumb), training "
        f"{t['time_all_s'] * gpus / 3600:.1f}, the two log-prob passes {2 * t['forward_time_one_gpu_s'] / 3600:.1f}. "
        "Kubernetes set-up: [flows and cluster](flows-and-cluster.md).",
        "",
    ]


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def scale_page(root: Path) -> str:
    head = [
        "# Scale on paper",
        "",
        f"Generated by `python -m pipeline.pages` from `{ASSUMPTIONS}`, the sampling bench it names in "
        f"`{BENCH_DIR}/` and the judge's price in `{PARAMS}`; do not edit it by hand. Every figure is an estimate "
        "computed from those inputs, not a measurement of this run: replace an assumption with a pilot run's "
        "measurement (a few hundred prompts through the pipeline on one node) and regenerate.",
        "",
    ]
    try:
        a = _load_json(root / ASSUMPTIONS)
        bench_file = a["sampling"]["bench"]
        bench = _load_json(root / BENCH_DIR / bench_file)
        llm = yaml.safe_load((root / PARAMS).read_text(encoding="utf-8"))["judge"]["llm"]
        price = llm["prices"][llm["model"]]
        e = estimate(a, bench, price)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return "\n".join([*head, f"The inputs could not be read: {type(err).__name__}: {err}."])
    title = (
        f"{num(a['run']['prompts'])} prompts × {a['run']['candidates_per_prompt']} candidates, an "
        f"{a['policy']['params'] / 1e9:.0f}B policy, {a['run']['nodes']} nodes of {a['run']['gpus_per_node']} "
        f"{a['gpu']['name'].split()[0]}s."
    )
    return "\n".join(
        [
            *head,
            title,
            "",
            *assumptions_section(a, bench_file, price),
            *sampling_section(a, e["sampling"], bench_file),
            *judge_section(a, e["judge"]),
            *training_section(a, e["training"]),
            *storage_section(a, e["storage"]),
            *pods_section(a, e),
        ]
    )
