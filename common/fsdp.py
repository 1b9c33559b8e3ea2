"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Accelerate: the few things train.py must do itself.

Accelerate shards the model in `prepare()` (one `fully_shard` unit per decoder layer, then the root),
replacing every parameter by a DTensor that holds 1/N of it on each rank. Three things then differ
from data parallel, and this module holds them:

1. On a CPU, Accelerate (1.16) never selects FSDP: `AcceleratorState` switches to FSDP only inside
   its GPU-family branch, so `torchrun` with `ACCELERATE_USE_FSDP=true` silently runs as MULTI_CPU
   (data parallel). `enable_cpu_fsdp` switches it on, so the same Accelerate code path that shards
   the model on GPUs runs, and is tested, on a CPU with gloo.
2. A sharded tensor is whole on no rank: saving the adapter, the optimizer state or a fingerprint
   needs `full_tensor()` (an all-gather) on EVERY rank, in the same order, before rank 0 writes.
   A rank-0-only call would wait forever for the others.
3. Loading a checkpoint puts each rank's slice of the full tensor back into the DTensor.
"""

from __future__ import annotations

import collections
import os

import torch

FSDP_ENV = "ACCELERATE_USE_FSDP"  # set by `accelerate launch` from a config with distributed_type: FSDP


def fsdp_requested() -> bool:
    """Whether this launch asks for FSDP (`accelerate launch --config_file accelerate_config.fsdp.yaml`, or
    `ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ... torchrun`)."""
    return os.environ.get(FSDP_ENV, "false").lower() == "true"


def enable_cpu_fsdp(accelerator) -> bool:
    """Switch a multi-process CPU accelerator (MULTI_CPU, gloo) to FSDP2 when the launch asked for FSDP.

    What Accelerate does itself on GPUs: build the plugin from the `FSDP_*` variables, give it the
    mixed precision, and set the distributed type; `prepare()` then takes its FSDP2 path. Call it
    right after `Accelerator(...)` and before `prepare()`.

    Args:
        accelerator: an `Accelerator(cpu=True)` under `torchrun --nproc_per_node N` (N >= 2).

    Returns:
        True when FSDP2 was switched on; False when there is nothing to do (no FSDP asked, not a
        multi-process CPU run, or Accelerate already chose FSDP).

    Raises:
        ValueError: FSDP was asked with `FSDP_VERSION` other than 2 (FSDP1 needs CUDA).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY, ... like Accelerate
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP_VERSION={plugin.fsdp_version}: only FSDP2 (fully_shard) runs on a CPU; "
            "use accelerate_config.fsdp.yaml (fsdp_version: 2)"
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole tensors, on the CPU: each DTensor is all-gathered, plain tensors are copied.

    Collective: every rank must call it with the same keys in the same order.

    Args:
        tensors: {name: tensor or DTensor}, e.g. the adapter's entries of `model.state_dict()`.

    Returns:
        {name: detached CPU tensor}, the same on every rank.
    """
    from torch.distributed.tensor import DTensor

    full = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        full[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).cpu()
    return full


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable (adapter) entries of `model.state_dict()`, gathered whole on every rank.

    Collective under FSDP (see `gather_full`); only the adapters travel, never the frozen base.

    Returns:
        {state-dict name: full CPU tensor}, the form `PeftModel.save_pretrained(state_dict=...)` takes.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return gather_full({name: t for name, t in model.state_dict().items() if name in trainable})


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full tensor, placed as `like` (a DTensor parameter or its optimizer state).

    Every rank read the same full tensor from the checkpoint, so each cuts its own slice: no
    communication (`src_data_rank=None`).

    Returns:
        A DTensor on `like`'s mesh and placements, or `tensor` itself when `like` is not a DTensor.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return tensor
    local = tensor.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def gather_sharded_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's full tensors when the model is FSDP-sharded, else None (the model holds them whole).

    Collective under FSDP: call it on every rank, then let rank 0 write.
    """
    return trainable_state_dict(model) if is_sharded(model) else None


def gather_optimizer_state(state_dict: dict) -> dict:
    """An optimizer `state_dict()` whose sharded (DTensor) states are gathered whole on the CPU.

    Collective: every rank must call it. The result is the one-process optimizer state, so a
    checkpoint has the same files and shapes with or without FSDP.
    """
    state = {}
    for index, param_state in sorted(state_dict["state"].items()):
        tensors = gather_full({key: value for key, value in param_state.items() if torch.is_tensor(value)})
        state[index] = {key: tensors.get(key, value) for key, value in param_state.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Inverse of `gather_optimizer_state` for this rank: each full state placed like its parameter.

    Args:
        state_dict: a full optimizer state (as read from a checkpoint), param indices as saved.
        optimizer: the prepared optimizer whose parameters are DTensors.

    Returns:
        The state dict to pass to `optimizer.load_state_dict`; states shaped like their parameter
        (AdamW's exp_avg, exp_avg_sq) become DTensors, scalars (step) stay as they are.
    """
    params = {}
    for saved, group in zip(state_dict["param_groups"], optimizer.param_groups, strict=True):
        params.update(zip(saved["params"], group["params"], strict=True))
    state = {}
    for index, param_state in state_dict["state"].items():
        param = params[index]
        state[index] = {
            key: shard_like(value, param) if torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in param_state.items()
        }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def describe_sharding(model: torch.nn.Module, num_processes: int) -> str:
    """One log line: how many fully_shard units, and how much of the model this rank holds.

    Args:
        model: the prepared model (parameters are DTensors where FSDP sharded them).
        num_processes: the world size.

    Returns:
        e.g. "FSDP2: fully_shard units {'LlamaDecoderLayer': 2, 'TrainedTokenLoss': 1} over 2 processes; this rank holds 1,611,168 of 3,222,336
        parameter elements (50.0%); 0 tensors left whole".
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = collections.Counter(
        type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)
    )
    total = local = whole = 0
    for param in model.parameters():
        total += param.numel()
        if isinstance(param, DTensor):
            local += param.to_local().numel()
        else:
            local += param.numel()
            whole += 1
    return (
        f"FSDP2: fully_shard units {dict(units)} over {num_processes} processes; this rank holds {local:,} of "
        f"{total:,} parameter elements ({local / max(total, 1):.1%}); {whole} tensors left whole"
    )


def clip_grad_norm_(accelerator, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` that also works for a subset of an FSDP2 model's parameters under fp16.

    Accelerate (1.16) under FSDP unscales the GradScaler's gradients, looks for a model whose
    parameters are exactly `parameters`, and, finding none (LoRA passes only the adapters), unscales
    a second time: "RuntimeError: unscale_() has already been called on this optimizer since the
    last update()". Here they are unscaled once, and the norm is that of the whole (gathered) gradients.

    Args:
        accelerator: the run's Accelerator.
        parameters: the parameters to clip (the trainable ones).
        max_norm: the largest global L2 norm allowed.

    Returns:
        The global gradient norm before clipping (a plain tensor, the same on every rank).
    """
    if not accelerator.is_fsdp2:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    from torch.distributed.tensor import DTensor

    accelerator.unscale_gradients()
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # sharded gradients: partial norms combined
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
