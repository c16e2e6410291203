"""Stage `reference`: log-probs of chosen and rejected under the reference model, computed once, at
training's precision (`train.bf16`), layout (`train.shared_prompt`), CPU attention kernel
(`train.cpu_attention`) and truncation (`reference.max_length` = `train.max_length`). The reference is the
starting policy, quantised to 4 bits as training's base where `train.lora.load_in_4bit` says so."""

from __future__ import annotations

import logging

import polars as pl

from pipeline import paths
from pipeline.cli import run_stage, stage_parser
from pipeline.io import read_table, write_json, write_table
from pipeline.model import loading, quantised
from pipeline.model.logprobs import pair_logprobs
from pipeline.model.precision import uses_bf16_autocast
from pipeline.settings.policy import PolicyParams
from pipeline.settings.train import ReferenceAndTraining

log = logging.getLogger("pipeline.reference")


class Settings(ReferenceAndTraining):
    """The sections of params.yaml this stage reads."""

    policy: PolicyParams


def main(argv: list[str] | None = None) -> None:
    args = stage_parser(__doc__).parse_args(argv)
    # Inputs and params: the reference is the starting policy
    cfg = Settings.load(args.params)
    params = cfg.reference
    pairs = read_table(paths.PAIRS, "pairs")
    device = loading.device_for()
    quantised.check_support(cfg.train.lora, device, cfg.source)  # before any model loads
    # The base training's adapter starts from (QLoRA: the same 4-bit model)
    model = quantised.load_base(paths.POLICY_DIR, cfg.policy.dtype, device, cfg.train.lora).eval()
    tokenizer = loading.load_tokenizer(paths.POLICY_DIR)

    # Work
    # scored as training scores them (cfg.train: its truncation, precision, layout and kernel)
    lw, ll, nw, nl = pair_logprobs(
        model, pairs, tokenizer.pad_token_id, params.batch_size, cfg.train, progress="reference"
    )

    # Outputs
    df = write_table(
        pl.DataFrame({"pair_id": pairs["pair_id"], "ref_w": lw, "ref_l": ll, "len_w": nw, "len_l": nl}),
        paths.REFERENCE,
        "reference",
    )
    write_json(
        {
            "n_pairs": len(df),
            "ref_w": df["ref_w"].mean(),
            "ref_l": df["ref_l"].mean(),
            "bf16_autocast": uses_bf16_autocast(device, cfg.train.bf16),
            "shared_prompt": cfg.train.shared_prompt,
            "cpu_attention": cfg.train.cpu_attention,
            "model_fingerprint": loading.fingerprint(paths.POLICY_DIR),
        },
        paths.metrics_file("reference"),
    )
    log.info(
        "reference log-probs for %d pairs: mean ref_w %.2f, ref_l %.2f",
        len(df),
        df["ref_w"].mean() or 0,
        df["ref_l"].mean() or 0,
    )


if __name__ == "__main__":
    run_stage(main)
