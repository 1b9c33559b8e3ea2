"""One precision rule for every script that runs the model: measured on a CPU, a fixed rule on a GPU.

CPU `auto` times fp32, bf16 and (native units only) fp16 matmuls at the model's shapes, as no fixed rule holds
(an AMX Xeon ran bf16 ~6x faster than fp32, an AVX512-BF16 Xeon without AMX at ~0.55x: DESIGN.md). A flag
wins (unsupported bf16 falls back). The MFU denominator (common/perf.py) is the FASTEST probed dtype's rate.
"""

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # keyed as the probe's figures
PROBE_NAMES = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # precision -> DTYPES key
ALIASES = {"auto": "auto", "no": "no", "fp32": "no", "float32": "no", "bf16": "bf16", "fp16": "fp16"}

PROBE_BUDGET_S = 1.0  # all probed dtypes together (the issue allows ~2 s at startup)
PROBE_TOKENS = 512  # rows of each probed matmul: a micro-batch of 4 x 128 non-padding tokens
PROBE_MAX_WIDTH = 16384  # a wider LM head runs at the same rate per FLOP; keeps the probe short
PROBE_MAX_FLOPS = 1e10  # per matmul: fewer rows for big models (~40 ms at 0.25 TFLOP/s)
PROBE_MIN_REPEATS, PROBE_MAX_REPEATS = 1, 20  # timed calls per shape, after one warm-up call
PROBE_ROUNDS = 3  # the dtypes are timed in turn this many times; each keeps its best round
MIN_SPEEDUP = 1.10  # a lower precision must be this much faster than the more accurate choice
CPU_FP16_FLAGS = {"avx512_fp16", "amx_fp16"}  # native fp16 matmul; without them fp16 is emulated
GPU_PEAK_SHAPES = [(4096, 4096, 4096, 1.0)]  # a square matmul that saturates a GPU's tensor cores


@dataclass
class PrecisionChoice:
    """The resolved precision and the measurements behind it (`probe_flops` empty when nothing was timed)."""

    requested: str  # the flag, normalized: "auto", "no", "bf16" or "fp16"
    precision: str  # "no", "bf16" or "fp16" (Accelerate's names)
    dtype: torch.dtype = field(init=False)  # of the frozen base and of autocast
    device: str  # "cpu", "cuda", ...
    reason: str  # one sentence: why this precision
    probe_flops: dict[str, float] = field(default_factory=dict)  # matmul FLOP/s per DTYPES key
    peak_flops: float | None = field(init=False)  # the fastest probed rate, whatever was chosen: the MFU denominator
    peak_dtype: str | None = field(init=False)
    probe_seconds: float = 0.0
    probe_shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (rows, in, out)

    def __post_init__(self):
        self.dtype = DTYPES[PROBE_NAMES[self.precision]]
        self.peak_dtype = max(self.probe_flops, key=self.probe_flops.get) if self.probe_flops else None
        self.peak_flops = self.probe_flops.get(self.peak_dtype)

    def to_json(self) -> dict:
        """The choice and the probe's figures, for config.json / metrics.json."""
        dtype, shapes = str(self.dtype).removeprefix("torch."), [list(s) for s in self.probe_shapes]
        return asdict(self) | {"dtype": dtype, "probe_seconds": round(self.probe_seconds, 3), "probe_shapes": shapes}

    def describe(self) -> str:
        """One log line: the choice, the figures and the MFU denominator."""
        line = f"precision {self.precision} ({PROBE_NAMES[self.precision]} base) on {self.device}: {self.reason}"
        if self.probe_flops:  # every probed rate is > 0, so there is a peak too
            figures = ", ".join(f"{name} {rate / 1e12:.3f}" for name, rate in self.probe_flops.items())
            line += f" | matmul TFLOP/s: {figures} ({self.probe_seconds:.1f} s probe)"
            line += f" | MFU against the {self.peak_dtype} peak {self.peak_flops / 1e12:.3f} TFLOP/s"
        return line


def read_cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_bf16_supported() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (AVX512-BF16, AMX or AVX512-BW emulation)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def probe_shapes(config, tokens: int = PROBE_TOKENS) -> list[tuple[int, int, int, float]]:
    """A training step's matmuls as [(rows, in, out, FLOPs per token of that kind)] (`config` None: 2048 wide):
    MLP up/gate and down, attention q/k/v/o (k/v at full width), the LM head on half the tokens."""
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or 2048
    inter = getattr(text, "intermediate_size", None) or 4 * hidden
    vocab = getattr(text, "vocab_size", None) or 32000
    layers = getattr(text, "num_hidden_layers", None) or 1
    heads = getattr(text, "num_attention_heads", None) or max(hidden // 64, 1)
    q_dim = heads * (getattr(text, "head_dim", None) or hidden // heads)
    kinds = [(hidden, inter, layers * 2 * hidden * inter), (inter, hidden, layers * hidden * inter)]
    kinds += [(hidden, q_dim, layers * 4 * hidden * q_dim), (hidden, min(vocab, PROBE_MAX_WIDTH), 0.5 * hidden * vocab)]
    return [(max(64, min(tokens, int(PROBE_MAX_FLOPS / (2 * k * n)) // 64 * 64)), k, n, float(w)) for k, n, w in kinds]


def _random_matrix(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Random values (constant ones run a few percent faster), tiled from a 64K block (randn is slow)."""
    block = torch.randn(1 << 16, device=device)
    return block.repeat(-(-rows * cols // block.numel()))[: rows * cols].view(rows, cols).to(dtype)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, shapes: list, budget_s: float) -> float:
    """FLOP/s of `dtype` matmuls mixed as `shapes` weigh them; per shape a warm-up call, then the best of its budget."""
    deadline, weighted_seconds = time.perf_counter() + budget_s, 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    for index, (rows, k, n, weight) in enumerate(shapes):
        a, b = _random_matrix(rows, k, device, dtype), _random_matrix(k, n, device, dtype)
        out = torch.matmul(a, b)
        share_end = time.perf_counter() + (deadline - time.perf_counter()) / (len(shapes) - index)
        times = []
        while len(times) < PROBE_MIN_REPEATS or (time.perf_counter() < share_end and len(times) < PROBE_MAX_REPEATS):
            sync(device)
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync(device)
            times.append(time.perf_counter() - start)
        weighted_seconds += weight / (2 * rows * k * n / max(min(times), 1e-9))
    return sum(s[3] for s in shapes) / weighted_seconds


def _best_rates(device: torch.device, names: list[str], shapes: list, budget_s: float, rounds: int) -> dict:
    """FLOP/s per dtype, best of `rounds` interleaved rounds: a burst of other work spoils a round, not a dtype."""
    figures: dict[str, float] = {}
    for _ in range(rounds):
        for name in names:
            rate = measure_matmul_flops(device, DTYPES[name], shapes, budget_s / len(names) / rounds)
            figures[name] = max(figures.get(name, 0.0), rate)
    return figures


def _cpu_rule(requested: str, native: list[str], figures: dict, logger: logging.Logger) -> tuple[str, str]:
    """(precision, reason) on a CPU: `auto` takes the fastest of `figures`; an explicit flag wins."""
    if requested == "auto":
        chosen = "no"
        for name in ("bf16", "fp16"):  # a lower precision must win by MIN_SPEEDUP (fp16 also scales the loss)
            if name in figures and figures[name] > figures[PROBE_NAMES[chosen]] * MIN_SPEEDUP:
                chosen = name
        ranked = " > ".join(sorted(figures, key=figures.get, reverse=True))
        fp16_note = "" if "fp16" in figures else "; fp16 not probed (no AVX512-FP16/AMX-FP16: emulated, slow)"
        return chosen, f"auto: the fastest dtype measured at this model's shapes ({ranked}){fp16_note}"
    if requested == "bf16" and "bf16" not in native:
        logger.warning("warning: this CPU has no bf16 support; training in fp32")
        return "no", "bf16 requested, but this CPU has no bf16 support"
    if requested == "fp16" and "fp16" not in native:
        logger.warning("warning: this CPU has no native fp16 matmul (AVX512-FP16/AMX-FP16); fp16 will be slow")
    return requested, f"{PROBE_NAMES[requested]} requested explicitly"


def _cuda_rule(requested: str, bf16_ok: bool, logger: logging.Logger) -> tuple[str, str]:
    """(precision, reason) on a GPU: the launcher's choice, else bf16 from compute capability 8.0, else fp16."""
    if requested == "auto":
        if (launcher := os.environ.get("ACCELERATE_MIXED_PRECISION")) in ("fp16", "bf16"):
            return launcher, "auto: accelerate launch's mixed precision"
        if bf16_ok:
            return "bf16", "auto: compute capability >= 8.0"
        return "fp16", "auto: compute capability < 8.0 (fp16 with loss scaling)"
    if requested == "bf16" and not bf16_ok:
        logger.warning("warning: bf16 is not supported on this GPU; falling back to fp16 with loss scaling")
        return "fp16", "bf16 requested, but this GPU (compute capability < 8.0) has no bf16"
    return requested, f"{PROBE_NAMES[requested]} requested explicitly"


def resolve_precision(
    requested: str,
    device: torch.device,
    config=None,
    *,
    measure_peak: bool = True,
    budget_s: float = PROBE_BUDGET_S,
    logger: logging.Logger | None = None,
) -> PrecisionChoice:
    """Resolve --mixed-precision / --dtype ("auto", "no"/"fp32"/"float32", "bf16", "fp16"; else ValueError).
    `config`: the model's (the CPU probe's shapes); `measure_peak`: also time the MFU denominator when the
    choice needs none (a flag, a GPU); `budget_s`: the CPU probe's, all dtypes. Other devices run fp32."""
    if requested not in ALIASES:
        raise ValueError(f"precision must be one of {', '.join(ALIASES)}, got '{requested}'")
    requested, logger = ALIASES[requested], logger or logging.getLogger(__name__)
    shapes = GPU_PEAK_SHAPES if device.type == "cuda" else probe_shapes(config)
    figures, start = {}, time.perf_counter()
    if device.type == "cuda":
        # Compute capability, not torch.cuda.is_bf16_supported(): that also says True on a T4 (emulated bf16).
        native = ["fp16"] + ["bf16"] * (torch.cuda.get_device_capability(device) >= (8, 0))
        if measure_peak:
            figures = _best_rates(device, native, shapes, 0.2 * len(native), rounds=1)
        precision, reason = _cuda_rule(requested, "bf16" in native, logger)
    elif device.type == "cpu":
        native = ["fp32"] + ["bf16"] * cpu_bf16_supported() + ["fp16"] * bool(read_cpu_flags() & CPU_FP16_FLAGS)
        if requested == "auto" or measure_peak:
            figures = _best_rates(device, native, shapes, budget_s, PROBE_ROUNDS)
        precision, reason = _cpu_rule(requested, native, figures, logger)
    else:
        precision, reason = "no", f"no precision rule for {device.type}: fp32"
    seconds, probed = (time.perf_counter() - start, [s[:3] for s in shapes]) if figures else (0.0, [])
    return PrecisionChoice(requested, precision, device.type, reason, figures, seconds, probed)


def remeasure_peak(choice: PrecisionChoice, config) -> float:
    """The peak dtype's FLOP/s timed again, for `MfuMeter.remeasure` (only called with a peak; it keeps the max)."""
    shapes = GPU_PEAK_SHAPES if choice.device == "cuda" else probe_shapes(config)
    rates = _best_rates(torch.device(choice.device), [choice.peak_dtype], shapes, PROBE_BUDGET_S, PROBE_ROUNDS)
    return rates[choice.peak_dtype]


def resolve_precision_on_main(requested: str, device: torch.device, config, logger: logging.Logger) -> PrecisionChoice:
    """`resolve_precision` on rank 0 alone, broadcast to all: one dtype, and no ranks timing each other's load."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    choice = [resolve_precision(requested, device, config, logger=logger) if PartialState().is_main_process else None]
    return broadcast_object_list(choice, from_process=0)[0]


def enable_cpu_fp16(accelerator, choice: PrecisionChoice) -> bool:
    """Switch on fp16 autocast and a CPU GradScaler: Accelerate's `mixed_precision="fp16"` on a CPU is a no-op.
    Then `prepare()` autocasts the forward, `backward` scales the loss, `clip_grad_norm_` unscales, inf/NaN
    steps are skipped. Call right after `Accelerator(...)`. False: not CPU fp16; ValueError: not an fp16 Accelerator."""
    if (choice.device, choice.precision, accelerator.device.type) != ("cpu", "fp16", "cpu"):
        return False
    if accelerator.mixed_precision != "fp16":
        raise ValueError(f"create the Accelerator with mixed_precision='fp16', not '{accelerator.mixed_precision}'")
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
    return True
