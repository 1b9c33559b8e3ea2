"""LoRA/QLoRA adapter setup, parameter accounting and per-layer adapter statistics.

model = apply_lora(model, rank=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"])
counts = count_parameters(model)      # {"trainable": ..., "total": ..., "trainable_pct": ...}
"""

from __future__ import annotations

import math
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

LORA_KEY = re.compile(r"layers\.(\d+)\.(?:.*\.)?(\w+)\.lora_([AB])\.")


class LoraSetupError(ValueError):
    """The LoRA configuration does not fit the model; the message says what to change."""


def bernoulli_drop_positions(
    n: int, p: float, generator: torch.Generator | None = None, draws: int | None = None
) -> torch.Tensor:
    """Sorted indices in [0, n) where an i.i.d. Bernoulli(p) mask drops, sampled from the gaps between drops.

    The gap between drops is Geometric(p) on {1, 2, ...}, so cumulative sums of Geometric(p) draws
    started at -1 are exactly the dropped positions: ~n*p random numbers instead of n (torch's CPU
    generator draws one at a time; at p=0.05 the dense mask was 14% of a LoRA step on CPU).
    `draws` is the batch of draws (default: enough for n at once with near certainty).
    """
    expected = n * p
    batch = draws or int(expected + 8 * math.sqrt(expected) + 16)  # one batch almost always suffices
    chunks, last = [], -1.0
    while True:
        gaps = torch.empty(batch, dtype=torch.float64).geometric_(p, generator=generator)
        positions = gaps.cumsum(0) + last  # float64 holds these integers exactly
        if positions[-1] >= n:
            chunks.append(positions[positions < n])
            break
        chunks.append(positions)
        last = positions[-1].item()
    return torch.cat(chunks).long()


class SampledGapDropout(torch.nn.Dropout):
    """`nn.Dropout` with the same distribution (i.i.d. Bernoulli(p) drops, survivors scaled by
    1/(1-p), identity in eval mode) whose CPU mask comes from `bernoulli_drop_positions`.

    Off CPU (CUDA's fused dropout is already fast), at p=0 or p=1 it is plain `nn.Dropout`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply dropout; see the class docstring."""
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        mask = torch.full((x.numel(),), 1 / (1 - self.p), dtype=x.dtype)
        mask[bernoulli_drop_positions(x.numel(), self.p)] = 0
        if self.inplace:
            return x.mul_(mask.view_as(x))
        return x * mask.view_as(x)


def use_sampled_gap_dropout(model: torch.nn.Module) -> int:
    """Swap every LoRA `nn.Dropout` for `SampledGapDropout` (same p); return how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = SampledGapDropout(p=layer.p, inplace=layer.inplace)
                swapped += 1
    return swapped


def parse_target_modules(value: str) -> list[str] | str:
    """`--target-modules` ("q_proj,k_proj,v_proj" or "all-linear") in PEFT's form: a list of names or "all-linear"."""
    if value.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in value.split(",") if name.strip()]


def check_target_modules(model: torch.nn.Module, target_modules: list[str] | str) -> None:
    """Fail before training if a target module name does not exist in this architecture.

    Raises:
        LoraSetupError: naming the unknown module(s) and the linear layers that do exist.
    """
    if target_modules == "all-linear":
        return
    linear_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    unknown = [name for name in target_modules if name not in linear_names]
    if unknown:
        raise LoraSetupError(
            f"--target-modules: {', '.join(unknown)} not found in this model; "
            f"linear layers are: {', '.join(sorted(linear_names))}"
        )


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def apply_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Freeze the base model and inject LoRA adapters (updates scaled by alpha / rank); only `lora_`
    parameters train. A 4-bit (`quantized`) base goes through `prepare_model_for_kbit_training` first.

    Raises:
        LoraSetupError: unknown target module, or anything other than adapters is trainable.
    """
    check_target_modules(model, target_modules)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    use_sampled_gap_dropout(model)
    assert_only_adapters_trainable(model)
    return model


def assert_only_adapters_trainable(model: torch.nn.Module) -> None:
    """Raise LoraSetupError listing any non-LoRA parameter that requires grad (trained by accident)."""
    leaked = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if leaked:
        raise LoraSetupError(f"base parameters are trainable: {leaked[:5]}{' ...' if len(leaked) > 5 else ''}")


def count_parameters(model: torch.nn.Module) -> dict:
    """{"trainable", "total", "trainable_pct"} parameters (4-bit weights counted as their logical size)."""
    trainable, total = 0, 0
    for param in model.parameters():
        n = param.numel()
        # bitsandbytes packs two 4-bit values per uint8 element
        if type(param).__name__ == "Params4bit":
            n *= 2
        total += n
        if param.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def lora_parameter_key(name: str) -> str | None:
    """Map a parameter name to "layer.module.A|B" (e.g. "3.q_proj.A"), or None if not a LoRA weight."""
    match = LORA_KEY.search(name)
    return f"{match.group(1)}.{match.group(2)}.{match.group(3)}" if match else None


def lora_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of every LoRA matrix's gradient, keyed "layer.module.A|B" (after backward; one host sync)."""
    keys, norms = [], []
    for name, param in model.named_parameters():
        key = lora_parameter_key(name)
        if key is not None and param.grad is not None:
            keys.append(key)
            norm = param.grad.detach().float().norm()
            # FSDP: a sharded gradient's norm is partial on each rank; full_tensor() combines them (collective)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not norms:
        return {}
    values = torch.stack(norms).tolist()
    return dict(zip(keys, values, strict=True))


@torch.no_grad()
def lora_update_ratios(model: torch.nn.Module) -> dict[str, float]:
    """{"layer.module": ||scale * B @ A||_F / ||W||_F}: how much each adapter changes its (de-quantized) weight."""
    ratios = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")) or "default" not in module.lora_A:
            continue
        match = re.search(r"layers\.(\d+)\.(?:.*\.)?(\w+)$", name)
        if not match:
            continue
        a = module.lora_A["default"].weight.float()
        b = module.lora_B["default"].weight.float()
        delta = (b @ a) * module.scaling["default"]
        weight = module.base_layer.weight
        if type(weight).__name__ == "Params4bit":
            import bitsandbytes.functional as bnb_functional

            weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        ratios[f"{match.group(1)}.{match.group(2)}"] = float(delta.norm() / weight.float().norm().clamp_min(1e-12))
    return ratios
