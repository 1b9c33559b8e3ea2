"""Performance accounting: FLOPs of a LoRA step and MFU (against common/precision.py's peak), memory, GPU use."""

import contextlib
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from common.loss import base_causal_lm


def count_matmul_params(model: torch.nn.Module) -> dict:
    """{"body": decoder linear weights (4-bit ones counted logically), "head", "lora", "layers", "hidden"}."""
    base = base_causal_lm(model)
    head = base.get_output_embeddings()
    body, lora = 0, 0
    for name, module in base.named_modules():
        if "lora_" in name:
            lora += module.weight.numel() if isinstance(module, torch.nn.Linear) else 0
        elif module is not head and getattr(module, "weight", None) is not None:
            # PEFT's LoRA wrappers (peft's own "Linear4bit" too) hold the base linear as `base_layer`: count it once
            if isinstance(module, torch.nn.Linear) and not hasattr(module, "base_layer"):
                body += module.in_features * module.out_features
    head_params, config = head.weight.numel() if head is not None else 0, base.config
    return dict(body=body, head=head_params, lora=lora, layers=config.num_hidden_layers, hidden=config.hidden_size)


def estimate_train_flops(params: dict, tokens: int, trained_tokens: int, sum_sq_len: int) -> float:
    """FLOPs of one LoRA training step, forward + backward (the README's formula; `sum_sq_len`: the sum of each
    sequence's non-padding length squared)."""
    # body: forward 2N + backward 2N for activation grads (frozen weights get none); adapters also get weight
    # grads; the LM head runs on trained positions only; causal attention scores and values, fwd + bwd
    attention = 12 * params["layers"] * params["hidden"] * sum_sq_len / 2
    return 4 * params["body"] * tokens + 6 * params["lora"] * tokens + 4 * params["head"] * trained_tokens + attention


@dataclass
class MfuMeter:
    """Model FLOPs utilization of each step against a peak that no step may exceed (MFU <= 1.0). Load can make the startup probe read low (a 2-core Xeon: 1.0-2.1 TFLOP/s bf16, 0.165 busy: `mfu 102%`),
    so a step above the peak has it measured again (`remeasure`, at most `max_remeasures` times) and, if
    the step still beats it, the step's own rate is the peak."""

    matmul_params: dict  # from `count_matmul_params`
    peak_flops: float | None  # FLOP/s (None: nothing measured, no MFU)
    remeasure: Callable[[], float] | None = None  # returns a fresh peak measurement
    max_remeasures: int = 3
    remeasured: int = 0

    def mfu(self, tokens: int, trained_tokens: int, sum_sq_len: int, seconds: float) -> float | None:
        """This step's FLOP/s over the peak (raised first when the step beat it); None without a peak."""
        if not self.peak_flops:
            return None
        achieved = estimate_train_flops(self.matmul_params, tokens, trained_tokens, sum_sq_len) / max(seconds, 1e-9)
        if achieved > self.peak_flops and self.remeasure is not None and self.remeasured < self.max_remeasures:
            self.remeasured += 1
            self.peak_flops = max(self.peak_flops, self.remeasure())
        self.peak_flops = max(self.peak_flops, achieved)
        return achieved / self.peak_flops


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far in MiB: CUDA max allocated on a GPU, the process's peak RSS (VmHWM) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_utilization(device: torch.device) -> float | None:
    """GPU utilization in percent, or None on a CPU or without pynvml."""
    try:
        return float(torch.cuda.utilization(device)) if device.type == "cuda" else None
    except Exception:  # pynvml missing or unsupported
        return None


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile (inductor, dynamic shapes) each decoder layer in place, the state dict's keys kept; returns how
    many. On a 2-core AMX Xeon: 1.2-1.3x the demo's tokens/s at LoRA dropout 0 (dropout splits the graph: slower)."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


@contextlib.contextmanager
def eager_modules(model: torch.nn.Module) -> Iterator[None]:
    """Compiled modules run eagerly inside (evaluation, generation: eval mode or a KV cache would recompile them)."""
    compiled = {m: m._compiled_call_impl for m in model.modules() if getattr(m, "_compiled_call_impl", None)}
    try:
        for module in compiled:
            module._compiled_call_impl = None
        yield
    finally:
        for module, impl in compiled.items():
            module._compiled_call_impl = impl
