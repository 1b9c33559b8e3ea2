"""FSDP2 (`torch.distributed.fsdp.fully_shard`) through Accelerate: the few things train.py must do itself.

Accelerate's `prepare()` makes every parameter a DTensor holding 1/N of it on each rank, whole on no rank
(docs/scale-out.md): saving needs `full_tensor()` (an all-gather) on EVERY rank, in the same order, before
rank 0 writes; a rank-0-only call would wait forever for the others. Loading puts each rank's slice back.
"""

import collections
import os

import torch


def fsdp_requested() -> bool:
    """Whether this launch asks for FSDP: `ACCELERATE_USE_FSDP=true` (set by `accelerate launch` from FSDP configs)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_cpu_fsdp(accelerator) -> bool:
    """Switch a multi-process CPU accelerator (MULTI_CPU, gloo) to FSDP2 when the launch asked for FSDP; return
    whether it did. Call it after `Accelerator(...)`, before `prepare()`. Accelerate (1.16) never selects FSDP on
    a CPU (`torchrun` with `ACCELERATE_USE_FSDP=true` silently runs data parallel); switched on here as Accelerate
    does on GPUs, its GPU code path runs, and is tested, on a CPU with gloo. ValueError unless `FSDP_VERSION=2`."""
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
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does
    return True


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2 shards (DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: whole detached CPU tensor}: DTensors all-gathered (collective: every rank, same keys, same order)."""
    tensors = {name: tensor.detach() for name, tensor in tensors.items()}
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for name, t in tensors.items()}


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a full tensor placed like the DTensor `like` (no communication), else `tensor`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return tensor
    local = tensor.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(local, like.device_mesh, like.placements, src_data_rank=None)


def gather_sharded_adapter(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's (trainable) entries of `model.state_dict()` whole when the model is FSDP-sharded, else None
    (the model holds them whole). Collective under FSDP: call it on every rank, then let rank 0 write."""
    if not is_sharded(model):
        return None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return gather_full({name: t for name, t in model.state_dict().items() if name in trainable})


def gather_optimizer_state(state_dict: dict) -> dict:
    """An optimizer `state_dict()` with its DTensor states gathered whole (collective): the one-process state."""
    state = {}
    for index, param_state in sorted(state_dict["state"].items()):
        state[index] = param_state | gather_full({key: v for key, v in param_state.items() if torch.is_tensor(v)})
    return {"state": state, "param_groups": state_dict["param_groups"]}


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Inverse of `gather_optimizer_state` for this rank: states shaped like their parameter become DTensors."""
    groups = zip(state_dict["param_groups"], optimizer.param_groups, strict=True)
    params = {i: p for saved, group in groups for i, p in zip(saved["params"], group["params"], strict=True)}
    state = {}
    for index, param_state in state_dict["state"].items():
        param = params[index]
        state[index] = {
            key: shard_like(value, param) if torch.is_tensor(value) and value.shape == param.shape else value
            for key, value in param_state.items()
        }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def describe_sharding(model: torch.nn.Module, num_processes: int) -> str:
    """One log line: the fully_shard units and how much of the prepared model this rank holds."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = collections.Counter(
        type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule)
    )
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    whole = sum(not isinstance(p, DTensor) for p in params)
    return (
        f"FSDP2: fully_shard units {dict(units)} over {num_processes} processes; this rank holds {local:,} of "
        f"{total:,} parameter elements ({local / max(total, 1):.1%}); {whole} tensors left whole"
    )


def clip_grad_norm_(accelerator, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """`accelerator.clip_grad_norm_` that also works for a subset of an FSDP2 model's parameters under fp16.

    Accelerate (1.16) under FSDP unscales, finds no model whose parameters are exactly `parameters`
    (LoRA passes only the adapters) and unscales again: "unscale_() has already been called". Here they
    are unscaled once. Returns the global norm before clipping, the same on every rank."""
    if not accelerator.is_fsdp2:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients()
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients: partial norms combined
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm
