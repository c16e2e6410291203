"""Process-group plumbing for training under ``torchrun``: DDP by default, FSDP2 by a param.

The train stage is launched the same way everywhere (``python -m stages.train``). With
``train.runtime.nproc > 1`` (or ``nnodes > 1``) it re-executes itself under ``torch.distributed.run``
(:mod:`pipeline.training.multinode`); each worker then calls :func:`init` which reads the
``RANK``/``WORLD_SIZE`` environment torchrun sets. NCCL is used on GPUs and gloo on CPU unless
``train.runtime.backend`` says otherwise.

:func:`wrap_policy` readies the policy for training: activation checkpointing of its decoder layers
(``train.gradient_checkpointing``), then DDP, or FSDP2 with its mixed-precision and CPU-offload policies
(:func:`fsdp_policies`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from pipeline.training import activation_checkpointing, multinode

if TYPE_CHECKING:
    from pipeline.settings.train import RuntimeParams, TrainSettings


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    strategy: str = "none"  # none | ddp | fsdp
    offload: bool = False  # FSDP2 keeps the shards, their gradients and optimiser state in CPU memory
    nodes: multinode.Nodes | None = None  # the machines of a run across several (None: one machine)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init(runtime: RuntimeParams) -> Context:
    """Join the process group torchrun prepared (or run single-process when not under torchrun)."""
    if not under_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return Context(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    backend: str = runtime.backend
    strategy = runtime.strategy
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda and runtime.offload and backend == "nccl":
        # Offloaded shards and gradients live in CPU memory: the gradient norm's all-reduce over them and the
        # broadcasts that load them run on CPU tensors, which NCCL does not take.
        backend = "cuda:nccl,cpu:gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    device = f"cuda:{local}" if use_cuda else "cpu"
    nodes = None
    if multinode.across_machines() and not dist.is_initialized():
        # the leader's processes first, so that rank 0 (which writes) is on the machine that runs the stage
        rank, nodes = multinode.init_process_group(backend, rank, world)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Context(
        rank=rank, world=world, local_rank=local, device=device, strategy=strategy, offload=runtime.offload, nodes=nodes
    )


def wrap(model, ctx: Context, *, bf16: bool):
    """Wrap for data parallelism: DDP, or FSDP2 (:func:`shard`; ``bf16``: ``train.bf16``)."""
    if not ctx.distributed:
        return model
    if ctx.strategy == "fsdp":
        return shard(model, ctx, bf16=bf16)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.local_rank] if ctx.device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def fsdp_policies(ctx: Context, *, bf16: bool) -> dict:
    """``fully_shard``'s keyword arguments: with ``train.bf16`` on a GPU, bf16 parameters and compute with the
    gradients reduced in fp32 (the sharded weights and AdamW stay in ``policy.dtype``); with
    ``train.runtime.offload``, the shards in CPU memory (pinned on a GPU machine, for fast copies)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    on_gpu = ctx.device.startswith("cuda")
    policies: dict = {}
    if bf16 and on_gpu:
        policies["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if ctx.offload:
        policies["offload_policy"] = CPUOffloadPolicy(pin_memory=on_gpu)
    return policies


def shard(model, ctx: Context, *, bf16: bool):
    """FSDP2: ``fully_shard`` each decoder layer, then the root, with :func:`fsdp_policies`. A model already
    sharded (loaded so by :mod:`pipeline.training.sharded_loading`) is returned as it is."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # A LoRA model (peft's wrapper) shards the transformers model inside it as the root: generation calls
    # that model's forward, not the wrapper's, and the root's all-gathers hang on its forward.
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(root, FSDPModule):
        return model
    policies = fsdp_policies(ctx, bf16=bf16)
    for layer in getattr(model.get_decoder(), "layers", []):
        fully_shard(layer, **policies)
    fully_shard(root, **policies)
    return model


def wrap_policy(model, ctx: Context, settings: TrainSettings) -> tuple[Callable, torch.nn.Module]:
    """The policy's ``(*ScoreBatch.args()) -> (log-prob sums, counts)``, ready
    for data parallelism, and the module whose gradient sync :class:`no_grad_sync` switches.

    With ``settings.gradient_checkpointing`` the decoder layers are checkpointed first, before FSDP2 shards
    them. DDP wraps a :class:`~pipeline.model.logprobs.ResponseLogprobs` module, so that its gradient
    hooks see the whole computation. FSDP2 shards ``model`` in place (generation and saving go
    through the same module) and scores through the model's own forward, since its all-gathers
    hang on the root module's forward.
    """
    from pipeline.model.logprobs import ResponseLogprobs, score_batch_via_forward

    activation_checkpointing.apply(model, settings, ctx.device)
    if ctx.distributed and ctx.strategy == "fsdp":
        wrap(model, ctx, bf16=settings.bf16)

        def forward(*args):
            return score_batch_via_forward(model, *args)

        return forward, model
    # under checkpointing the LM head's logits are replayed too: at a 49k vocabulary they outweigh the layers' inputs
    module = wrap(ResponseLogprobs(model, checkpoint_head=settings.gradient_checkpointing), ctx, bf16=settings.bf16)
    return module, module


def unwrap(model):
    return getattr(model, "module", model)


class no_grad_sync:
    """Skip the gradient all-reduce for all but the last micro-batch of a step (DDP and FSDP2)."""

    def __init__(self, model, ctx: Context, skip: bool):
        self.model, self.ctx, self.skip = model, ctx, skip and ctx.distributed
        self._cm = None

    def __enter__(self):
        if not self.skip:
            return self
        if self.ctx.strategy == "fsdp":
            self.model.set_requires_gradient_sync(False)
        else:
            self._cm = self.model.no_sync()
            self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.skip:
            return False
        if self.ctx.strategy == "fsdp":
            self.model.set_requires_gradient_sync(True)
        else:
            self._cm.__exit__(*exc)
        return False


def gather_tensor(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Concatenate a 1-D tensor of possibly different lengths from every rank (rank order)."""
    if not ctx.distributed:
        return t
    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts).to(t.device)


def full_state_dict(model, ctx: Context, *, trainable_only: bool = False) -> dict:
    """The full (unsharded) model state dict on CPU. Every rank must call it (FSDP2 gathers the shards); under
    FSDP2 only rank 0 receives the tensors, the other ranks an empty dict. ``trainable_only`` leaves the
    frozen parameters out (a LoRA run's base), so that they are never gathered: the parameters that train
    alone (under FSDP2 with the buffers, which nothing trains)."""
    if ctx.strategy == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=opts)
    plain = unwrap(model)
    if trainable_only:
        # From the parameters, not state_dict(): bitsandbytes' 4-bit layers repack their weights in place there
        return {n: p.detach().cpu() for n, p in plain.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {k: v.detach().cpu() for k, v in plain.state_dict().items()}


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}


def load_model_state(module, state: dict) -> None:
    """``module.load_state_dict(state)``, where ``state`` may leave out what does not train (frozen
    parameters, buffers, a 4-bit base's quantisation state) and nothing else."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if unexpected or set(missing) & _trainable(module):
        raise RuntimeError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")


def optimizer_state(model, opt, ctx: Context) -> dict:
    if ctx.strategy == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_states(model, opt, model_sd: dict, opt_sd: dict, ctx: Context) -> None:
    if ctx.strategy == "fsdp" and ctx.distributed:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # A full state dict may leave out frozen parameters: each rank keeps its own shards of those.
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, opt, opt_sd, options=opts)
        return
    load_model_state(unwrap(model), model_sd)
    opt.load_state_dict(opt_sd)


def from_rank0(obj, ctx: Context):
    """Rank 0's ``obj`` on every rank (pickled; the other ranks' ``obj`` is ignored)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
