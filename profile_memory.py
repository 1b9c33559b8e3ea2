"""Memory pre-flight: estimate training memory per component, choose LoRA or QLoRA for a GPU budget.

    python profile_memory.py                                          # default model, a T4 (16 GiB), 4 x 1024
    python profile_memory.py --model configs/qwen2.5-7b-instruct.json --gpu-memory 16 --seq-len 2048
    python profile_memory.py --model Qwen/Qwen2.5-0.5B-Instruct --gpu-memory 8 --batch-size 8 --rank 16
    python profile_memory.py --measure --batch-size 2 --seq-len 256   # + real steps: measured vs estimate
    python profile_memory.py --run-dir runs/demo                      # saves runs/demo/memory_profile.json

What it does:
- Estimate from the model config alone (an alias, a folder, a hub id or a config.json file; no
  weights): base weights (fp32/fp16/bf16, or NF4 with double quantization at 4.127 bits per
  parameter), LoRA parameters, their gradients and AdamW states, activations saved for backward
  (with and without gradient checkpointing), autocast weight copies, the logits/loss buffers
  (trained tokens x vocab) and a stated framework allowance. One table per component, for LoRA and
  QLoRA, with and without checkpointing. The formulas are in `common/memory_estimator.py`.
- Decide: LoRA or QLoRA for the budget (`--gpu-memory`, default a 16 GiB T4, minus
  `--safety-margin`), the largest micro-batch and sequence length that fit, and the gradient
  accumulation that keeps the effective batch (`--batch-size`). An option fits only when its
  estimate plus the estimator's measured error (`--error-band`, 16%) fits; LoRA that fits only
  micro-batch 1 loses to QLoRA that fits a larger one (see `common.memory_estimator.recommend_setup`).
  Printed, and saved as JSON (`--output`, or `<run-dir>/memory_profile.json`).
- Measure (`--measure`): a few real training steps of that configuration in a fresh process (the
  same loss, autocast and AdamW as train.py) and the measured peak next to the estimate: CUDA peak
  reserved (and allocated) on a GPU; on CPU the peak RSS of the steps minus the RSS of a bare
  `import torch, transformers`.

Device (`--device`): the estimate follows the device: on a GPU the LoRA base is stored in fp16
(`--dtype`) and autocast runs in fp16 (a T4 has no bf16); on a CPU both are what train.py's
`--mixed-precision auto` picks on this machine (`common.precision`: the fastest dtype measured at
the model's shapes; train.py stores the frozen base in it). `auto` plans for a GPU unless
`--measure` runs on a machine without one.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.jsonio import write_json
from common.memory import MemoryEstimateError, Setup
from common.memory_estimator import DEFAULT_GPU_MEMORY_GB, estimate_memory, recommend_setup
from common.memory_measure import compare_to_measurement, measure_in_subprocess
from common.model import DEFAULT_MODEL, ModelLoadError, load_config
from common.precision import PROBE_NAMES, resolve_precision
from common.preflight import DEFAULT_SAFETY_MARGIN, ESTIMATE_ERROR_BAND, GIB, NF4_BITS_PER_PARAM

REPO = Path(__file__).resolve().parent
# the saved report's "settings", in this order
REPORT_SETTINGS = (
    "rank",
    "target_modules",
    "trained_fraction",
    "device",
    "compute_dtype",
    "lora_dropout",
    "batch_size",
    "seq_len",
    "dtype",
)
VARIANTS = {  # column name -> (quantization, gradient checkpointing)
    "LoRA": (None, False),
    "LoRA+GC": (None, True),
    "QLoRA": ("nf4", False),
    "QLoRA+GC": ("nf4", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- model ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder, hub id or config.json file")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom config code from the hub")
    # --- training settings ---
    parser.add_argument("--batch-size", type=int, default=4, help="effective batch (sequences per optimizer step)")
    parser.add_argument("--seq-len", type=int, default=1024, help="padded tokens per sequence")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r")
    parser.add_argument(
        "--target-modules", default="q_proj,k_proj,v_proj", help="comma-separated module names or all-linear"
    )
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (its mask is kept for backward)")
    parser.add_argument(
        "--trained-fraction",
        type=float,
        default=0.5,
        help="share of tokens with a label (assistant tokens); the LM head runs only there",
    )
    # --- device and budget ---
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="device the estimate is for (auto: cuda, or cpu when --measure runs without a GPU)",
    )
    parser.add_argument(
        "--gpu-memory", type=float, default=DEFAULT_GPU_MEMORY_GB, help="memory budget in GiB (16 = a T4)"
    )
    parser.add_argument(
        "--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN, help="fraction of the budget kept free"
    )
    parser.add_argument(
        "--error-band", type=float, default=ESTIMATE_ERROR_BAND, help="the estimate's own relative error, counted"
    )
    parser.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="LoRA base dtype (default fp16 GPU, CPU: auto)"
    )
    parser.add_argument(
        "--compute-dtype",
        choices=["fp32", "fp16", "bf16"],
        default=None,
        help="autocast dtype, also QLoRA's compute dtype (default fp16 on GPU (T4); CPU: train.py's auto)",
    )
    # --- measurement ---
    parser.add_argument("--measure", action="store_true", help="run real training steps and report measured peak")
    parser.add_argument(
        "--method", choices=["auto", "lora", "qlora"], default="auto", help="what --measure runs (auto: recommended)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force checkpointing on/off for --measure (default: as recommended)",
    )
    parser.add_argument("--measure-steps", type=int, default=2, help="training steps to measure (>= 2: AdamW states)")
    # --- output ---
    parser.add_argument("--run-dir", default=None, help="save <run-dir>/memory_profile.json")
    parser.add_argument("--output", default=None, help="JSON output path (default runs/memory_profile.json)")
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Exit with an actionable message on impossible settings."""
    checks = [
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.seq_len >= 16, f"--seq-len must be >= 16, got {args.seq_len}"),
        (args.rank >= 1, f"--rank must be >= 1, got {args.rank}"),
        (0 < args.trained_fraction <= 1, f"--trained-fraction must be in (0, 1], got {args.trained_fraction}"),
        (args.gpu_memory > 0, f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}"),
        (0 <= args.safety_margin < 1, f"--safety-margin must be in [0, 1), got {args.safety_margin}"),
        (0 <= args.error_band < 1, f"--error-band must be in [0, 1), got {args.error_band}"),
        (args.measure_steps >= 1, f"--measure-steps must be >= 1, got {args.measure_steps}"),
        (
            not (args.device == "cuda" and args.measure and not torch.cuda.is_available()),
            "--measure --device cuda needs a GPU; use --device cpu to measure on this machine",
        ),
    ]
    for ok, message in checks:
        if not ok:
            sys.exit(f"error: {message}")


def format_table(estimates: dict[str, dict]) -> str:
    """Markdown table: one row per component, one column per variant, in GiB."""
    names = list(next(iter(estimates.values()))["components"])
    lines = ["| component | " + " | ".join(estimates) + " |", "|---" * (len(estimates) + 1) + "|"]
    for name in [*names, "total"]:
        cells = [(e["total"] if name == "total" else e["components"][name]) / GIB for e in estimates.values()]
        label = f"**{name}**" if name == "total" else name
        lines.append(f"| {label} | " + " | ".join(f"{value:.3f}" for value in cells) + " |")
    return "\n".join(lines)


def format_recommendation(decision: dict, batch_size: int) -> str:
    """A few lines a user can act on."""
    if decision["method"] == "none":
        return f"recommendation: does not fit. {decision['reason']}"
    flags = "--quantization nf4 " if decision["method"] == "qlora" else ""
    flags += "--gradient-checkpointing " if decision["gradient_checkpointing"] else "--no-gradient-checkpointing "
    flags += f"--batch-size {decision['micro_batch_size']} --effective-batch-size {decision['effective_batch_size']} "
    flags += f"--max-seq-len {decision['seq_len']}"
    lines = [
        f"recommendation: {'LoRA' if decision['method'] == 'lora' else 'QLoRA'} - {decision['reason']}",
        f"  estimated {decision['estimated_gb']:.2f} GiB, {decision['estimated_with_band_gb']:.2f} with the "
        f"{decision['error_band']:.0%} estimate error, of {decision['usable_gb']:.2f} GiB usable "
        f"({decision['budget_gb']:g} GiB, {decision['safety_margin']:.0%} margin): {decision['headroom_gb']:.2f} GiB spare",
        f"  micro-batch {decision['micro_batch_size']} x accumulation {decision['gradient_accumulation_steps']} "
        f"= effective batch {decision['effective_batch_size']} (asked {batch_size}); "
        f"largest micro-batch at this length {decision['max_micro_batch_size']}, "
        f"longest sequence at this micro-batch {decision['max_seq_len']}",
        f"  train.py {flags}",
    ]
    return "\n".join(lines)


def measure_configuration(args: argparse.Namespace, config, decision: dict, setup: Setup) -> dict:
    """Run real training steps of the recommended (or forced) configuration; print and return the comparison."""
    method = decision["method"] if args.method == "auto" else args.method
    if method == "none":
        sys.exit("error: nothing fits the budget, so there is no configuration to measure; pass --method")
    quantization = "nf4" if method == "qlora" else None
    if args.gradient_checkpointing is not None:
        gc = args.gradient_checkpointing
    else:  # the recommendation's choice, or train.py's default (on for QLoRA) for a forced method
        gc = decision["gradient_checkpointing"] if args.method == "auto" else method == "qlora"
    batch_size, seq_len = args.batch_size, args.seq_len
    if args.method == "auto":
        batch_size, seq_len = decision["micro_batch_size"], decision["seq_len"]
    load_dtype = setup.compute_dtype if quantization else setup.dtype
    option = replace(setup, quantization=quantization, dtype=load_dtype, gradient_checkpointing=gc)
    option.batch_size, option.seq_len = batch_size, seq_len
    print(f"measuring {args.measure_steps} steps of {method} (checkpointing {gc}) at {batch_size} x {seq_len} ...")
    measurement = measure_in_subprocess(args.model, option, args.measure_steps)
    # estimate exactly what ran, with the batch's real share of trained tokens
    trained_fraction = measurement["trained_tokens"] / (batch_size * seq_len)
    estimate = estimate_memory(config, replace(option, trained_fraction=trained_fraction))
    comparison = compare_to_measurement(estimate, measurement)
    if setup.device == "cuda":
        what = f"CUDA peak reserved; peak allocated {measurement['max_allocated_bytes'] / GIB:.3f} GiB"
    else:
        what = "peak RSS of the steps minus a bare `import torch, transformers`"
    print(
        f"measured {comparison['measured_bytes'] / GIB:.3f} GiB ({what}) | estimated "
        f"{comparison['estimated_bytes'] / GIB:.3f} GiB | ratio {comparison['ratio']:.2f} | "
        f"step {min(measurement['step_times_s']):.1f} s"
    )
    return {**measurement, "estimate": estimate, **comparison}


def plan_dtypes(dtype: str | None, compute_dtype: str | None, device: str, config) -> tuple[str, str]:
    """The LoRA base dtype and the compute dtype to plan for, as train.py would pick them.

    Args:
        dtype, compute_dtype: --dtype / --compute-dtype (None: the default).
        device: "cuda" (plans for a T4: fp16 and fp16) or "cpu" (train.py's `--mixed-precision auto` on
            this machine, which stores the frozen base in its compute dtype).
        config: the model's config (the CPU probe runs at its shapes).

    Returns:
        (dtype, compute_dtype) as "fp32" / "fp16" / "bf16".
    """
    if device == "cuda":
        return dtype or "fp16", compute_dtype or "fp16"
    if dtype is None or compute_dtype is None:
        chosen = PROBE_NAMES[resolve_precision("auto", torch.device("cpu"), config, measure_peak=False).precision]
        return dtype or chosen, compute_dtype or chosen
    return dtype, compute_dtype


def main(argv: list[str] | None = None) -> dict:
    """Estimate, decide, optionally measure; print the report and save it as JSON. Returns the report."""
    args = parse_args(argv)
    validate_args(args)
    device = args.device
    if device == "auto":
        device = "cpu" if args.measure and not torch.cuda.is_available() else "cuda"
    output = Path(
        args.output
        or (Path(args.run_dir) / "memory_profile.json" if args.run_dir else REPO / "runs/memory_profile.json")
    )
    try:
        config = load_config(args.model, trust_remote_code=args.trust_remote_code)
        dtype, compute_dtype = plan_dtypes(args.dtype, args.compute_dtype, device, config)
        # the LoRA setup; QLoRA loads the base in the compute dtype
        setup = Setup(
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            rank=args.rank,
            target_modules=args.target_modules,
            dtype=dtype,
            device=device,
            compute_dtype=compute_dtype,
            lora_dropout=args.dropout,
            trained_fraction=args.trained_fraction,
        )
        estimates = {
            name: estimate_memory(
                config, replace(setup, quantization=q, dtype=compute_dtype if q else dtype, gradient_checkpointing=gc)
            )
            for name, (q, gc) in VARIANTS.items()
        }
        decision = recommend_setup(config, setup, args.gpu_memory, args.safety_margin, args.error_band)
    except (ModelLoadError, MemoryEstimateError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")

    details = estimates["LoRA"]["details"]
    arch, params = details["architecture"], details["params"]
    print(
        f"{args.model}: {arch['model_type']}, {params['total'] / 1e6:.1f}M params, {arch['layers']} layers, "
        f"hidden {arch['hidden']}, heads {arch['heads']}/{arch['kv_heads']} kv, vocab {arch['vocab']}"
        f"{' (tied)' if arch['tied'] else ''}; LoRA r={args.rank} on {','.join(details['settings']['target_modules'])} "
        f"= {details['lora_params'] / 1e6:.2f}M params"
    )
    print(
        f"estimate for {device}: batch {args.batch_size} x {args.seq_len} tokens, {args.trained_fraction:.0%} trained; "
        f"LoRA base {dtype}, compute {compute_dtype}, NF4 {NF4_BITS_PER_PARAM:.3f} bits/param (GiB)"
    )
    print(format_table(estimates))
    print(f"overhead: {details['overhead']}")
    print(format_recommendation(decision, args.batch_size))

    report = {
        "model": args.model,
        "device": device,
        "settings": {name: getattr(setup, name) for name in REPORT_SETTINGS},
        "architecture": arch,
        "params": params,
        "estimates": estimates,
        "recommendation": decision,
        "measurement": None,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.measure:
        report["measurement"] = measure_configuration(args, config, decision, setup)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json(output, report)
    print(f"saved {output}")
    return report


if __name__ == "__main__":
    main()
