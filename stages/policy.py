"""Stage `policy`: the starting policy as a local model folder, optionally warmed up by SFT on gold
solutions, and its greedy accuracy on the test prompts (and on the validation prompts, where there are any:
``val_accuracy`` in its metrics)."""

from __future__ import annotations

import logging

import polars as pl

from pipeline import paths
from pipeline.analysis.accuracy import greedy_eval, validation_eval
from pipeline.cli import run_stage, stage_parser
from pipeline.generation.registry import sampler_for
from pipeline.generation.transformers_backend import TransformersSampler
from pipeline.generation.types import Sampler
from pipeline.io import read_table, write_json, write_table
from pipeline.model import loading
from pipeline.model.encoding import encode_prompt, encode_response
from pipeline.settings.evaluate import BeforeAndAfter
from pipeline.settings.sampling import VLLMParams
from pipeline.training.sft import train_sft

log = logging.getLogger("pipeline.policy")


class Settings(BeforeAndAfter):
    """The sections of params.yaml this stage reads (and evaluate's decoder, which must match)."""

    vllm: VLLMParams


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Inputs and params
    cfg = Settings.load(args.params)
    params = cfg.policy
    prompts = read_table(paths.PROMPTS, "prompts")

    # Load (the builtin GGUF model is converted once and cached)
    model, tokenizer = loading.load_policy(loading.resolve(params.model), params.dtype, loading.device_for())

    # Optional SFT warm-up on the gold solutions of the warm-up split
    warm = prompts.filter((pl.col("split") == "warmup") & pl.col("solution").is_not_null())
    sft_losses: list[float] = []
    if params.warmup.enabled:
        if len(warm) == 0:
            raise ValueError(
                f"policy.warmup.enabled: no warm-up prompts with a gold solution in {paths.PROMPTS} "
                "(set prepare.n_warmup > 0, or disable the warm-up)"
            )
        sft_losses = train_sft(
            model,
            [encode_prompt(tokenizer, p) for p in warm["prompt"]],
            [encode_response(tokenizer, s) for s in warm["solution"]],
            params.warmup,
            pad_id=tokenizer.pad_token_id,
        )

    # Outputs: the model folder, then its greedy accuracy on the test prompts
    loading.save_model(
        model,
        tokenizer,
        paths.POLICY_DIR,
        {"source": params.model, "warmup": params.warmup.model_dump() if params.warmup.enabled else None},
    )
    model_id = loading.fingerprint(paths.POLICY_DIR)
    if params.eval.backend == "transformers":
        sampler: Sampler = TransformersSampler.from_model(model, tokenizer, model_id, params.eval.batch_size)
    else:
        del model  # free the device for the vLLM engine
        sampler = sampler_for(
            params.eval.backend,
            paths.POLICY_DIR,
            dtype=params.dtype,
            batch_size=params.eval.batch_size,
            vllm=cfg.vllm,
            model_id=model_id,
        )
    test = prompts.filter(pl.col("split") == "test")
    try:
        gens, accuracy = greedy_eval(sampler, test, params.eval.max_new_tokens, "policy")
        val = validation_eval(sampler, prompts, params.eval.max_new_tokens, "policy")
    finally:
        sampler.close()
    write_table(gens, paths.POLICY_GENERATIONS, "generations")
    metrics = {
        "test_accuracy": accuracy,
        "n_test": len(test),
        "model_fingerprint": model_id,
        "warmup_steps": len(sft_losses),
        "warmup_final_loss": sft_losses[-1] if sft_losses else None,
        "warmup_first_loss": sft_losses[0] if sft_losses else None,
    }
    if val is not None:  # only with validation prompts, so that a run without them writes what it always did
        metrics.update(val_accuracy=val[1], n_val=val[0].height)
    write_json(metrics, paths.metrics_file("policy"))
    log.info("starting policy %s: greedy test accuracy %.1f%% on %d prompts", model_id, 100 * accuracy, len(test))
    if not 0.2 <= accuracy <= 0.7:
        log.warning(
            "greedy accuracy %.1f%% is outside 20-70%%: candidates may be all right or all wrong, "
            "and most groups will tie",
            100 * accuracy,
        )


if __name__ == "__main__":
    run_stage(main)
