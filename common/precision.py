"""One precision rule for every script that runs the model: measured on a CPU, a fixed rule on a GPU.

    from common.precision import resolve_precision
    choice = resolve_precision("auto", torch.device("cpu"), model.config)
    choice.precision      # "no" | "bf16" | "fp16": train.py's --mixed-precision, Accelerate's mixed_precision
    choice.dtype          # the frozen base's dtype and the autocast dtype (float32 = no autocast)
    choice.peak_flops     # the FASTEST probed dtype's matmul rate on this machine: the MFU denominator
    with choice.autocast(): ...           # evaluate.py, merge_and_load.py
    enable_cpu_fp16(accelerator, choice)  # train.py, right after Accelerator(...): fp16 on a CPU

CPU, `auto`: no fixed rule holds (an AMX Xeon ran bf16 ~6x faster than fp32, an AVX512-BF16 Xeon
without AMX ran bf16 at ~0.55x fp32: DESIGN.md), so it times fp32 and bf16 matmuls at the model's
own shapes (hidden x intermediate, intermediate x hidden, hidden x hidden, hidden x vocab), and fp16
only where the CPU has native fp16 matmul units (AVX512-FP16 or AMX-FP16; elsewhere it is emulated
and slow), within `PROBE_BUDGET_S` in all. The fastest wins; a lower precision must beat the more
accurate one by `MIN_SPEEDUP` (ties keep the more accurate dtype, and fp16 also costs loss scaling).
GPU, `auto`: `accelerate launch`'s mixed precision when one was configured, else bf16 on compute
capability >= 8.0 (Ampere and newer) and fp16 with loss scaling below it (a T4). An explicit flag
always wins (bf16 on a GPU or CPU without bf16 falls back, with a warning).

The MFU denominator is the fastest dtype's rate, whatever was chosen, so a slow choice shows up as a
low MFU instead of hiding behind its own slow peak.

Trap: Accelerate's `mixed_precision="fp16"` on a CPU is a silent no-op (no autocast, no GradScaler;
accelerate 1.15). `enable_cpu_fp16` switches on both through Accelerate's own hooks, so the training
loop (accelerator.backward / clip_grad_norm_ / optimizer.step / accelerator.autocast) is unchanged.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBE_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # how the probe's figures are keyed
# --mixed-precision / --dtype spellings -> precision
ALIASES = {"auto": "auto", "no": "no", "fp32": "no", "float32": "no", "bf16": "bf16", "fp16": "fp16"}

PROBE_BUDGET_S = 1.0  # all probed dtypes together (the issue allows ~2 s at startup)
PROBE_TOKENS = 512  # rows of each probed matmul: a micro-batch of 4 x 128 non-padding tokens
PROBE_MAX_WIDTH = 16384  # a wider LM head runs at the same rate per FLOP; keeps the probe short
PROBE_MAX_FLOPS = 1e10  # per matmul: fewer rows for big models (~40 ms at 0.25 TFLOP/s)
PROBE_MIN_REPEATS, PROBE_MAX_REPEATS = 1, 20  # timed calls per shape, after one warm-up call
PROBE_ROUNDS = 3  # the dtypes are timed in turn this many times; each keeps its best round
MIN_SPEEDUP = 1.10  # a lower precision must be this much faster than the more accurate choice
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")  # native fp16 matmul; without them fp16 is emulated
GPU_PEAK_SIZE = 4096  # square matmul that saturates a GPU's tensor cores (the card's own peak)


@dataclass
class PrecisionChoice:
    """The resolved precision and the measurements behind it.

    Attributes:
        requested: the flag as given ("auto", "no"/"fp32", "bf16", "fp16").
        precision: "no", "bf16" or "fp16" (Accelerate's names).
        dtype: dtype of the frozen base and of autocast.
        device_type: "cpu" or "cuda".
        reason: one sentence: why this precision.
        probe: measured matmul FLOP/s per dtype ("fp32", "bf16", "fp16") at the model's shapes (CPU)
            or at a square `GPU_PEAK_SIZE` matmul (GPU); empty when nothing was measured.
        peak_flops: the fastest probed rate (the MFU denominator), or None when nothing was measured.
        peak_dtype: the dtype that reached `peak_flops`.
        probe_seconds: wall time the probe took.
        shapes: the probed (rows, in, out) matmul shapes.
    """

    requested: str
    precision: str
    dtype: torch.dtype
    device_type: str
    reason: str
    probe: dict[str, float] = field(default_factory=dict)
    peak_flops: float | None = None
    peak_dtype: str | None = None
    probe_seconds: float = 0.0
    shapes: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def cpu_fp16(self) -> bool:
        """fp16 on a CPU: autocast and the GradScaler are ours to switch on (`enable_cpu_fp16`)."""
        return self.device_type == "cpu" and self.precision == "fp16"

    def autocast(self):
        """Autocast context in `dtype` on this device; a no-op for fp32."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device_type, dtype=self.dtype if enabled else torch.bfloat16, enabled=enabled)

    def to_json(self) -> dict:
        """The choice and the probe's figures, for config.json / metrics.json."""
        return {
            "requested": self.requested,
            "precision": self.precision,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device_type,
            "reason": self.reason,
            "probe_flops": self.probe,
            "peak_flops": self.peak_flops,
            "peak_dtype": self.peak_dtype,
            "probe_seconds": round(self.probe_seconds, 3),
            "probe_shapes": [list(s) for s in self.shapes],
        }

    def describe(self) -> str:
        """One log line: the choice, the figures and the MFU denominator."""
        figures = ", ".join(f"{name} {rate / 1e12:.3f}" for name, rate in self.probe.items())
        line = f"precision {self.precision} ({PROBE_NAMES[self.precision]} base) on {self.device_type}: {self.reason}"
        if figures:
            line += f" | matmul TFLOP/s: {figures} ({self.probe_seconds:.1f} s probe)"
        if self.peak_flops:
            line += f" | MFU against the {self.peak_dtype} peak {self.peak_flops / 1e12:.3f} TFLOP/s"
        return line


def normalize_precision(name: str) -> str:
    """Map a --mixed-precision / --dtype value to "auto", "no", "bf16" or "fp16".

    Raises:
        ValueError: an unknown name.
    """
    if name not in ALIASES:
        raise ValueError(f"precision must be one of {', '.join(ALIASES)}, got '{name}'")
    return ALIASES[name]


def read_cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_bf16_supported() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16, AMX or AVX512-BW emulation)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def probe_shapes(config, tokens: int = PROBE_TOKENS) -> list[tuple[int, int, int, float]]:
    """The matmuls a training step spends its time in, with their share of the step's FLOPs.

    Args:
        config: the model's transformers config (hidden_size, intermediate_size, vocab_size, heads),
            or None for a generic 2048-wide model.
        tokens: rows of each matmul (tokens of a micro-batch).

    Returns:
        [(rows, in, out, weight)]: MLP up/gate (hidden x intermediate), MLP down (intermediate x
        hidden), attention (hidden x heads*head_dim) and the LM head (hidden x vocab, on the half
        of the tokens that carry a label); weight = FLOPs per token of that kind in the whole model.
    """
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or 2048
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    vocab = getattr(text, "vocab_size", None) or 32000
    layers = getattr(text, "num_hidden_layers", None) or 1
    heads = getattr(text, "num_attention_heads", None) or max(hidden // 64, 1)
    q_dim = heads * (getattr(text, "head_dim", None) or hidden // heads)
    kinds = [
        (hidden, inter, layers * 2 * hidden * inter),
        (inter, hidden, layers * hidden * inter),
        (hidden, q_dim, layers * 4 * hidden * q_dim),  # q, k, v, o (k/v counted at full width)
        (hidden, min(vocab, PROBE_MAX_WIDTH), 0.5 * hidden * vocab),
    ]
    shapes = []
    for k, n, weight in kinds:
        rows = max(64, min(tokens, int(PROBE_MAX_FLOPS / (2 * k * n)) // 64 * 64))
        shapes.append((rows, k, n, float(weight)))
    return shapes


def _random_matrix(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A rows x cols matrix of random values, tiled from a 64K block.

    Random rather than constant values (constant operands toggle fewer bits and can run a few percent
    faster); tiled, because randn of the 135M model's whole LM-head matrix took longer than its matmul.
    """
    block = torch.randn(1 << 16, device=device)
    return block.repeat(-(-rows * cols // block.numel()))[: rows * cols].view(rows, cols).to(dtype)


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int, float]], budget_s: float
) -> float:
    """Time dense matmuls of `dtype` at `shapes` and return the rate the model's mix of them gets.

    Each shape: one warm-up call (kernel selection, oneDNN JIT), then timed calls into a preallocated
    output until its share of what is left of `budget_s` is spent (at least `PROBE_MIN_REPEATS`);
    the best time counts.

    Args:
        device: where to measure.
        dtype: the matmul dtype.
        shapes: from `probe_shapes`: (rows, in, out, weight).
        budget_s: seconds for all shapes together, warm-up calls included (one slow shape can overrun
            it by its minimum calls).

    Returns:
        FLOP/s: sum(weight) / sum(weight / rate of the shape), the rate of a step whose matmul
        FLOPs split as the weights say.
    """
    deadline = time.perf_counter() + budget_s
    weighted_seconds = 0.0
    for index, (rows, k, n, weight) in enumerate(shapes):
        a, b = _random_matrix(rows, k, device, dtype), _random_matrix(k, n, device, dtype)
        out = torch.matmul(a, b)
        share_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(shapes) - index)
        best, repeats = math.inf, 0
        while repeats < PROBE_MIN_REPEATS or (time.perf_counter() < share_end and repeats < PROBE_MAX_REPEATS):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best, repeats = min(best, time.perf_counter() - start), repeats + 1
        weighted_seconds += weight / (2 * rows * k * n / max(best, 1e-9))
    return sum(s[3] for s in shapes) / weighted_seconds


def choose_fastest(figures: dict[str, float]) -> str:
    """The fastest probed dtype, where a lower precision must win by `MIN_SPEEDUP`.

    Args:
        figures: FLOP/s per probed dtype ("fp32" always, "bf16" / "fp16" when probed).

    Returns:
        "no", "bf16" or "fp16".
    """
    chosen = "fp32"
    for name in ("bf16", "fp16"):
        if name in figures and figures[name] > figures[chosen] * MIN_SPEEDUP:
            chosen = name
    return {"fp32": "no"}.get(chosen, chosen)


def probe_cpu(config, budget_s: float = PROBE_BUDGET_S, flags: set[str] | None = None) -> tuple[dict, list, float]:
    """Measure fp32, bf16 (where oneDNN supports it) and fp16 (native units only) at the model's shapes.

    Args:
        config: the model's config (see `probe_shapes`).
        budget_s: seconds for all dtypes together.
        flags: CPU flags (default `read_cpu_flags()`).

    Returns:
        ({"fp32": FLOP/s, ...}, the shapes probed, seconds the probe took).
    """
    flags = read_cpu_flags() if flags is None else flags
    candidates = {"fp32": torch.float32}
    if cpu_bf16_supported():
        candidates["bf16"] = torch.bfloat16
    if any(flag in flags for flag in CPU_FP16_FLAGS):
        candidates["fp16"] = torch.float16
    shapes = probe_shapes(config)
    start = time.perf_counter()
    figures: dict[str, float] = {}
    # Interleaved rounds, best of each: a burst of other work on the CPU spoils one round, not a dtype's figure.
    for _ in range(PROBE_ROUNDS):
        for name, dtype in candidates.items():
            rate = measure_matmul_flops(torch.device("cpu"), dtype, shapes, budget_s / len(candidates) / PROBE_ROUNDS)
            figures[name] = max(figures.get(name, 0.0), rate)
    return figures, shapes, time.perf_counter() - start


def _resolve_cpu(requested: str, config, measure_peak: bool, budget_s: float, logger) -> PrecisionChoice:
    """CPU: `auto` measures and takes the fastest; an explicit flag wins (bf16 falls back without support)."""
    figures, shapes, seconds = ({}, [], 0.0)
    if requested == "auto" or measure_peak:
        figures, shapes, seconds = probe_cpu(config, budget_s)
    if requested == "auto":
        precision = choose_fastest(figures)
        ranked = " > ".join(sorted(figures, key=figures.get, reverse=True))
        reason = f"auto: the fastest dtype measured at this model's shapes ({ranked})"
        if "fp16" not in figures:
            reason += "; fp16 not probed (no AVX512-FP16/AMX-FP16: emulated, slow)"
    elif requested == "bf16" and not cpu_bf16_supported():
        logger.warning("warning: this CPU has no bf16 support; training in fp32")
        precision, reason = "no", "bf16 requested, but this CPU has no bf16 support"
    else:
        precision, reason = requested, f"{PROBE_NAMES[requested]} requested explicitly"
        if requested == "fp16" and not any(flag in read_cpu_flags() for flag in CPU_FP16_FLAGS):
            logger.warning("warning: this CPU has no native fp16 matmul (AVX512-FP16/AMX-FP16); fp16 will be slow")
    return _with_peak(requested, precision, "cpu", reason, figures, seconds, shapes)


def remeasure_peak(choice: PrecisionChoice, config=None, budget_s: float = PROBE_BUDGET_S) -> float:
    """Time the peak dtype's matmuls again (the MFU denominator), e.g. when a step beat the first probe.

    Args:
        choice: the resolved precision whose `peak_dtype` is timed again.
        config: the model's config (CPU: the probe's shapes).
        budget_s: seconds the measurement may take.

    Returns:
        The better of the new figure and `choice.peak_flops` (0.0 when nothing was probed).
    """
    if not choice.peak_dtype:
        return 0.0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice.peak_dtype]
    if choice.device_type == "cuda":
        device, shapes = torch.device("cuda"), [(GPU_PEAK_SIZE, GPU_PEAK_SIZE, GPU_PEAK_SIZE, 1.0)]
    else:
        device, shapes = torch.device("cpu"), probe_shapes(config)
    rate = max(measure_matmul_flops(device, dtype, shapes, budget_s / PROBE_ROUNDS) for _ in range(PROBE_ROUNDS))
    return max(rate, choice.peak_flops or 0.0)


def _resolve_cuda(requested: str, device: torch.device, measure_peak: bool, logger) -> PrecisionChoice:
    """GPU: the fixed rule (bf16 from compute capability 8.0, else fp16); the card's peak is measured."""
    # Compute capability, not torch.cuda.is_bf16_supported(): that also says True on a T4 (emulated bf16).
    bf16_ok = torch.cuda.get_device_capability(device) >= (8, 0)
    if requested == "auto":
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if launcher in ("fp16", "bf16"):
            precision, reason = launcher, "auto: accelerate launch's mixed precision"
        else:
            precision = "bf16" if bf16_ok else "fp16"
            reason = f"auto: compute capability {'>= 8.0' if bf16_ok else '< 8.0 (fp16 with loss scaling)'}"
    elif requested == "bf16" and not bf16_ok:
        logger.warning("warning: bf16 is not supported on this GPU; falling back to fp16 with loss scaling")
        precision, reason = "fp16", "bf16 requested, but this GPU (compute capability < 8.0) has no bf16"
    else:
        precision, reason = requested, f"{PROBE_NAMES[requested]} requested explicitly"
    figures, seconds, shapes = {}, 0.0, []
    if measure_peak:
        start = time.perf_counter()
        shapes = [(GPU_PEAK_SIZE, GPU_PEAK_SIZE, GPU_PEAK_SIZE, 1.0)]
        for name, dtype in [("fp16", torch.float16)] + ([("bf16", torch.bfloat16)] if bf16_ok else []):
            figures[name] = measure_matmul_flops(device, dtype, shapes, budget_s=0.2)
        seconds = time.perf_counter() - start
    return _with_peak(requested, precision, "cuda", reason, figures, seconds, [s[:3] for s in shapes])


def _with_peak(
    requested: str, precision: str, device_type: str, reason: str, figures: dict, seconds: float, shapes: list
) -> PrecisionChoice:
    """Build the choice; the MFU denominator is the fastest of `figures`, whatever `precision` is."""
    peak_dtype = max(figures, key=figures.get) if figures else None
    return PrecisionChoice(
        requested=requested,
        precision=precision,
        dtype=PRECISION_DTYPES[precision],
        device_type=device_type,
        reason=reason,
        probe=figures,
        peak_flops=figures[peak_dtype] if peak_dtype else None,
        peak_dtype=peak_dtype,
        probe_seconds=seconds,
        shapes=[tuple(s[:3]) for s in shapes],
    )


def resolve_precision(
    requested: str,
    device: torch.device,
    config=None,
    *,
    measure_peak: bool = True,
    budget_s: float = PROBE_BUDGET_S,
    logger: logging.Logger | None = None,
) -> PrecisionChoice:
    """Resolve --mixed-precision / --dtype for `device` (see the module docstring for the rule).

    Args:
        requested: "auto", "no"/"fp32", "bf16" or "fp16".
        device: where the model runs ("cpu" or "cuda"; anything else runs fp32).
        config: the model's config: the CPU probe runs at its shapes (None: generic 2048-wide shapes).
        measure_peak: also measure the MFU denominator (the fastest dtype's rate) when the choice
            itself needs no measurement (an explicit flag, or a GPU).
        budget_s: seconds the CPU probe may take, all dtypes together.
        logger: receives the warnings about fallbacks (default: this module's logger).

    Returns:
        The `PrecisionChoice`.

    Raises:
        ValueError: an unknown precision name.
    """
    requested = normalize_precision(requested)
    logger = logger or logging.getLogger(__name__)
    if device.type == "cuda":
        return _resolve_cuda(requested, device, measure_peak, logger)
    if device.type == "cpu":
        return _resolve_cpu(requested, config, measure_peak, budget_s, logger)
    return _with_peak(requested, "no", device.type, f"no precision rule for {device.type}: fp32", {}, 0.0, [])


def resolve_precision_on_main(
    requested: str, device: torch.device, config=None, logger: logging.Logger | None = None
) -> PrecisionChoice:
    """`resolve_precision` on the main process only, broadcast to every rank.

    Every rank must train in the same dtype, and N ranks timing matmuls at once on shared cores
    would measure each other; so rank 0 measures alone while the others wait.

    Args:
        requested, device, config, logger: as for `resolve_precision`.

    Returns:
        Rank 0's `PrecisionChoice`, on every rank.
    """
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    if state.num_processes == 1:
        return resolve_precision(requested, device, config, logger=logger)
    choice = [resolve_precision(requested, device, config, logger=logger) if state.is_main_process else None]
    return broadcast_object_list(choice, from_process=0)[0]


def enable_cpu_fp16(accelerator, choice: PrecisionChoice) -> bool:
    """Switch on fp16 autocast and a CPU GradScaler that Accelerate leaves off on a CPU.

    Accelerate (1.15) accepts `mixed_precision="fp16"` on a CPU but sets neither `native_amp` (its
    autocast) nor a scaler. With both set, `prepare()` wraps the model's forward in fp16 autocast,
    `accelerator.autocast()` autocasts, `backward` scales the loss, `clip_grad_norm_` unscales first,
    and the prepared optimizer steps through the scaler (skipping inf/NaN updates). Call it right
    after `Accelerator(...)` and before `prepare()`.

    Args:
        accelerator: an `Accelerator(cpu=True, mixed_precision="fp16")`.
        choice: the resolved precision.

    Returns:
        True when it switched fp16 on, False when there was nothing to do (not fp16 on a CPU).

    Raises:
        ValueError: the choice is CPU fp16 but the accelerator was not created with mixed_precision="fp16".
    """
    if not choice.cpu_fp16 or accelerator.device.type != "cpu":
        return False
    if accelerator.mixed_precision != "fp16":
        raise ValueError(f"create the Accelerator with mixed_precision='fp16', not '{accelerator.mixed_precision}'")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return True
