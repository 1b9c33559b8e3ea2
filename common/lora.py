"""LoRA/QLoRA adapter setup, parameter accounting and per-layer adapter statistics."""

import math
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training


class LoraSetupError(ValueError):
    """The LoRA configuration does not fit the model; the message says what to change."""


def bernoulli_drop_positions(
    n: int, p: float, generator: torch.Generator | None = None, draws: int | None = None
) -> torch.Tensor:
    """Sorted indices in [0, n) where an i.i.d. Bernoulli(p) mask drops, sampled from the gaps between drops:
    Geometric(p) gaps on {1, 2, ...} summed from -1 are exactly the dropped positions, ~n*p random numbers instead
    of n (torch's CPU generator draws one at a time; at p=0.05 the dense mask was 14% of a LoRA step on CPU).
    `draws`: the batch size (default: all n at once, nearly surely)."""
    batch = draws or int(n * p + 8 * math.sqrt(n * p) + 16)  # one batch almost always suffices
    positions = torch.tensor([-1.0], dtype=torch.float64)  # a drop just before position 0
    while positions[-1] < n:
        gaps = torch.empty(batch, dtype=torch.float64).geometric_(p, generator=generator)
        positions = torch.cat([positions, gaps.cumsum(0) + positions[-1]])  # float64 holds these integers exactly
    return positions[(positions >= 0) & (positions < n)].long()


class SampledGapDropout(torch.nn.Dropout):
    """`nn.Dropout` with the same distribution (i.i.d. Bernoulli(p) drops, survivors scaled by 1/(1-p), identity
    in eval mode) whose CPU mask comes from `bernoulli_drop_positions`; off CPU, at p=0 or p=1 it is `nn.Dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply dropout; see the class docstring."""
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        dropped = bernoulli_drop_positions(x.numel(), self.p)  # x * 1/(1-p) rounds once, as x.float() * an fp32 mask
        return (x.reshape(-1) * (1 / (1 - self.p))).index_fill(0, dropped, 0).view(x.shape)


class CastUnlessAutocast:
    """PEFT's `cast_input_dtype_enabled` of a LoRA layer, read as a bool at each forward: the adapter input is cast to
    the adapter dtype only where no autocast runs. Under autocast the A matmul casts it back anyway (7 copies of a
    layer's input a step with all-linear): bit-identical, a bf16 step of the demo model 3-6% faster."""

    def __bool__(self) -> bool:
        return not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def parse_target_modules(value: str) -> list[str] | str:
    """`--target-modules` ("q_proj,k_proj,v_proj" or "all-linear") in PEFT's form: a list of names or "all-linear"."""
    return "all-linear" if value.strip() == "all-linear" else [n.strip() for n in value.split(",") if n.strip()]


def apply_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str] | str,
    quantized: bool = False,
    gradient_checkpointing: bool = False,
) -> PeftModel:
    """Freeze the base model and inject LoRA adapters (updates scaled by alpha / rank); only `lora_` parameters
    train. A 4-bit (`quantized`) base goes through `prepare_model_for_kbit_training` first. LoraSetupError on an
    unknown target module, or if anything other than adapters is trainable."""
    # fail before training on a name this architecture lacks (bitsandbytes' 4/8-bit layers are nn.Linear too)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [name for name in target_modules if name not in linear_names] if target_modules != "all-linear" else []
    if unknown:
        raise LoraSetupError(
            f"--target-modules: {', '.join(unknown)} not found in this model; "
            f"linear layers are: {', '.join(sorted(linear_names))}"
        )
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(  # bias: PEFT's default "none", so only the lora_ weights train
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    for module in model.modules():  # every LoRA nn.Dropout -> SampledGapDropout (same p); the input cast as above
        if isinstance(dropouts := getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            dropouts.update({n: SampledGapDropout(p=d.p) for n, d in dropouts.items() if type(d) is torch.nn.Dropout})
            module.cast_input_dtype_enabled = CastUnlessAutocast()
    assert_only_adapters_trainable(model)
    return model


def assert_only_adapters_trainable(model: torch.nn.Module) -> None:
    """Raise LoraSetupError listing any non-LoRA parameter that requires grad (trained by accident)."""
    leaked = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if leaked:
        raise LoraSetupError(f"base parameters are trainable: {leaked[:5]}{' ...' if len(leaked) > 5 else ''}")


def count_parameters(model: torch.nn.Module) -> dict:
    """{"trainable", "total", "trainable_pct"} parameters (4-bit weights counted as their logical size)."""
    total = trainable = 0
    for param in model.parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)  # bitsandbytes: two 4-bit per uint8
        total += n
        trainable += n if param.requires_grad else 0
    return {"trainable": trainable, "total": total, "trainable_pct": 100.0 * trainable / max(total, 1)}


def lora_parameter_key(name: str) -> str | None:
    """Map a parameter name to "layer.module.A|B" (e.g. "3.q_proj.A"), or None if not a LoRA weight."""
    match = re.search(r"layers\.(\d+)\.(?:.*\.)?(\w+)\.lora_([AB])\.", name)
    return ".".join(match.groups()) if match else None


def lora_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of every LoRA matrix's gradient, keyed "layer.module.A|B" (after backward; one host sync)."""
    keys, norms = [], []
    for name, param in model.named_parameters():
        if (key := lora_parameter_key(name)) is not None and param.grad is not None:
            keys.append(key)
            norm = param.grad.detach().float().norm()
            # FSDP: a sharded gradient's norm is partial on each rank; full_tensor() combines them (collective)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return dict(zip(keys, torch.stack(norms).tolist(), strict=True)) if norms else {}


@torch.no_grad()
def lora_update_ratios(model: torch.nn.Module) -> dict[str, float]:
    """{"layer.module": ||scale * B @ A||_F / ||W||_F}: how much each adapter changes its (de-quantized) weight."""
    ratios = {}
    for name, module in model.named_modules():
        match = re.search(r"layers\.(\d+)\.(?:.*\.)?(\w+)$", name)
        if not match or not hasattr(module, "base_layer") or "default" not in getattr(module, "lora_A", {}):
            continue
        lora_a, lora_b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
        delta = (lora_b @ lora_a) * module.scaling["default"]
        weight = module.base_layer.weight
        if type(weight).__name__ == "Params4bit":
            import bitsandbytes.functional as bnb_functional

            weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        ratios[f"{match.group(1)}.{match.group(2)}"] = float(delta.norm() / weight.float().norm().clamp_min(1e-12))
    return ratios
