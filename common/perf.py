"""Performance accounting: FLOPs of a LoRA step (for MFU), peak memory, GPU utilization.

The peak matmul rate the MFU is measured against is probed by common/precision.py.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.loss import base_causal_lm


def count_matmul_params(model: torch.nn.Module) -> dict:
    """Parameters that take part in matmuls, split as the FLOP formula needs them.

    Returns:
        {"body": decoder linear weights (quantized counted logically), "head": LM head weights,
         "lora": adapter weights, "layers", "hidden", "heads"}
    """
    base = base_causal_lm(model)
    head = base.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    body, lora = 0, 0
    for name, module in base.named_modules():
        if "lora_" in name:
            if isinstance(module, torch.nn.Linear):
                lora += module.weight.numel()
            continue
        if module is head or not hasattr(module, "weight") or module.weight is None:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit":
            body += module.in_features * module.out_features
    config = base.config
    return {
        "body": body,
        "head": head_params,
        "lora": lora,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def estimate_train_flops(params: dict, tokens: int, trained_tokens: int, sum_sq_len: int) -> float:
    """FLOPs of one LoRA training step (forward + backward), by the formula stated in the README.

    flops = 4 * N_body * tokens            (forward 2N, backward 2N for activation grads; frozen
                                            base weights need no weight grads)
          + 6 * N_lora * tokens            (adapters: forward, activation and weight grads)
          + 4 * N_head * trained_tokens    (LM head only on trained positions)
          + 12 * layers * hidden * sum(len^2) / 2  (causal attention scores and values, fwd + bwd)

    Args:
        params: from `count_matmul_params`.
        tokens: non-padding tokens in the step.
        trained_tokens: tokens with a label.
        sum_sq_len: sum over sequences of (non-padding length)^2.

    Returns:
        Estimated FLOPs.
    """
    attention = 12 * params["layers"] * params["hidden"] * sum_sq_len / 2
    return 4 * params["body"] * tokens + 6 * params["lora"] * tokens + 4 * params["head"] * trained_tokens + attention


@dataclass
class MfuMeter:
    """Model FLOPs utilization of each step against a peak that no step may exceed.

    The peak is a short matmul probe at startup, which other work on the CPU can make read low (a
    quiet 2-core Xeon measured 1.0-2.1 TFLOP/s bf16, the same probe under load 0.165: `mfu 102%`).
    When a step achieves more than the peak, the peak is measured again (at most `max_remeasures`
    times) and, if the step still beats it, the step's own rate becomes the peak: the machine just
    did that. So a logged MFU is never above 1.0.

    Attributes:
        matmul_params: from `count_matmul_params`.
        peak_flops: the MFU denominator in FLOP/s (None: nothing measured, no MFU).
        remeasure: returns a fresh peak measurement (None: never re-measure).
        max_remeasures: re-measurements allowed in a run.
        remeasured: re-measurements done so far.
    """

    matmul_params: dict
    peak_flops: float | None
    remeasure: Callable[[], float] | None = None
    max_remeasures: int = 3
    remeasured: int = 0

    def mfu(self, tokens: int, trained_tokens: int, sum_sq_len: int, seconds: float) -> float | None:
        """This step's MFU (<= 1.0), raising the peak first when the step beat it.

        Args:
            tokens, trained_tokens, sum_sq_len: as for `estimate_train_flops`.
            seconds: the step's wall time.

        Returns:
            The step's FLOP/s over the peak, or None without a peak.
        """
        if not self.peak_flops:
            return None
        achieved = estimate_train_flops(self.matmul_params, tokens, trained_tokens, sum_sq_len) / max(seconds, 1e-9)
        if achieved > self.peak_flops and self.remeasure is not None and self.remeasured < self.max_remeasures:
            self.remeasured += 1
            self.peak_flops = max(self.peak_flops, self.remeasure())
        self.peak_flops = max(self.peak_flops, achieved)
        return achieved / self.peak_flops


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on GPU, process peak RSS (VmHWM) on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_utilization(device: torch.device) -> float | None:
    """GPU utilization in percent (needs pynvml), or None on CPU / when unavailable."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing or unsupported
        return None
