"""Memory tables for the README: which models fit a T4 for LoRA / QLoRA, and measured vs estimated on CPU.

    python benchmarks/memory_table.py                                    # T4 table for configs/*.json
    python benchmarks/memory_table.py --output benchmarks/results/memory_table.md
    python benchmarks/memory_table.py --measure --output benchmarks/results/memory_profile_cpu.md

The first table is pure estimation (no weights, no GPU): for each shipped config and sequence length,
the estimated peak of LoRA (fp16 base) and QLoRA (NF4) at `--batch-size` with and without gradient
checkpointing, the largest micro-batch that fits the budget, and what `profile_memory.py` recommends.
`--measure` instead runs real training steps of the default model on this machine's CPU (fresh
process per configuration) and tabulates measured peak RSS (minus a bare `import torch,
transformers`) next to the estimate.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.memory import Setup  # noqa: E402  (the repo root must be on sys.path first)
from common.memory_estimator import (  # noqa: E402
    count_architecture_parameters,
    describe_architecture,
    estimate_memory,
    recommend_setup,
)
from common.memory_measure import compare_to_measurement, measure_in_subprocess  # noqa: E402
from common.model import DEFAULT_MODEL, load_config  # noqa: E402
from common.preflight import ESTIMATE_ERROR_BAND, GIB, MIB  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- estimate table ---
    parser.add_argument("--configs", default=str(REPO / "configs"), help="folder of config.json files")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048], help="sequence lengths")
    parser.add_argument("--batch-size", type=int, default=4, help="effective batch to keep")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj", help="LoRA target modules")
    parser.add_argument("--gpu-memory", type=float, default=16, help="budget in GiB (16 = T4)")
    # --- measurement on this machine ---
    parser.add_argument("--measure", action="store_true", help="measured vs estimated on this CPU instead")
    parser.add_argument("--measure-seq-lens", type=int, nargs="+", default=[256, 512], help="measured lengths")
    parser.add_argument("--measure-batch-size", type=int, default=2, help="measured micro-batch")
    parser.add_argument(
        "--fixed-mmap-threshold",
        action="store_true",
        help="measure with MALLOC_MMAP_THRESHOLD_=131072 (live-tensor peak; much slower steps)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="measured compute dtype: bf16 autocast (LoRA's base fp32, QLoRA's bf16) or fp32 throughout",
    )
    parser.add_argument("--machine", default="2-core CPU, 24 GiB, no GPU", help="machine description for the header")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    return parser.parse_args(argv)


def build_fit_table(args: argparse.Namespace) -> list[str]:
    """Rows of the T4 table, one per (config, sequence length)."""
    configs = [(path, load_config(str(path))) for path in sorted(Path(args.configs).glob("*.json"))]
    configs.sort(key=lambda item: count_architecture_parameters(describe_architecture(item[1]))["total"])
    lines = [
        f"| model | params | seq | LoRA fp16 GiB (GC) | LoRA max micro-batch | QLoRA NF4 GiB (GC) "
        f"| QLoRA max micro-batch | recommendation for {args.gpu_memory:g} GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, config in configs:
        params = count_architecture_parameters(describe_architecture(config))["total"]
        for seq_len in args.seq_lens:
            setup = Setup(args.batch_size, seq_len, args.rank, args.target_modules)  # fp16 on CUDA, as a T4
            decision = recommend_setup(config, setup, args.gpu_memory)
            cells = []
            for quantization, method in ((None, "lora"), ("nf4", "qlora")):
                variants = [
                    replace(setup, quantization=quantization, gradient_checkpointing=gc) for gc in (False, True)
                ]
                totals = [estimate_memory(config, variant)["total"] / GIB for variant in variants]
                best = max(
                    c["max_micro_batch_size"] for c in decision["candidates"] if c["method"] == method
                )  # over GC on/off
                cells += [f"{totals[0]:.1f} ({totals[1]:.1f})", f"{best}" if best else "does not fit"]
            if decision["method"] == "none":
                advice = "nothing fits"
            else:
                advice = (
                    f"{'LoRA' if decision['method'] == 'lora' else 'QLoRA'}"
                    f"{' + GC' if decision['gradient_checkpointing'] else ''}, "
                    f"{decision['micro_batch_size']} x {decision['gradient_accumulation_steps']}"
                    + ("" if decision["fits"] else f", seq <= {decision['seq_len']}")
                )
            lines.append(f"| {path.stem} | {params / 1e9:.2f}B | {seq_len} | " + " | ".join(cells) + f" | {advice} |")
    return lines


def build_measure_table(args: argparse.Namespace) -> list[str]:
    """Rows of measured vs estimated peak memory of the default model on this CPU."""
    config = load_config(DEFAULT_MODEL)
    # a fixed mmap threshold makes glibc hand every freed buffer back: the peak RSS is then the
    # live-tensor peak, to compare with the estimate minus its allocator allowance
    extra_env = {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.fixed_mmap_threshold else None
    lines = [
        "| method | GC | batch x seq | trained tokens | measured MiB | estimated MiB | ratio "
        "| estimate w/o allocator allowance MiB | ratio | step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    batch = args.measure_batch_size
    compute = args.compute_dtype
    for quantization, dtype in ((None, "fp32"), ("nf4", compute)):
        for gc in (False, True):
            for seq_len in args.measure_seq_lens:
                setup = Setup(batch, seq_len, args.rank, args.target_modules, quantization, dtype, gc, "cpu", compute)
                measurement = measure_in_subprocess(DEFAULT_MODEL, setup, steps=2, extra_env=extra_env)
                trained_fraction = measurement["trained_tokens"] / (batch * seq_len)
                estimate = estimate_memory(config, replace(setup, trained_fraction=trained_fraction))
                comparison = compare_to_measurement(estimate, measurement)
                live = comparison["estimated_bytes"] - estimate["details"]["allocator_allowance"]
                lines.append(
                    f"| {'QLoRA' if quantization else 'LoRA'} | {'on' if gc else 'off'} | {batch} x {seq_len} "
                    f"| {measurement['trained_tokens']} | {comparison['measured_bytes'] / MIB:.0f} "
                    f"| {comparison['estimated_bytes'] / MIB:.0f} | {comparison['ratio']:.2f} "
                    f"| {live / MIB:.0f} | {live / comparison['measured_bytes']:.2f} "
                    f"| {min(measurement['step_times_s']):.1f} |"
                )
                print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> str:
    """Print the table (and write it to --output); return the markdown."""
    args = parse_args(argv)
    header = [
        f"<!-- generated by `python benchmarks/memory_table.py {' '.join(argv if argv is not None else sys.argv[1:])}` -->",
        f"Machine: {args.machine} ({platform.processor() or platform.machine()}, Python {platform.python_version()}). "
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}.",
        "",
    ]
    if args.measure:
        header.append(
            f"Default model ({DEFAULT_MODEL}) on CPU: LoRA on fp32 weights, QLoRA NF4 with bf16 compute, bf16 autocast, "
            f"r={args.rank} on {args.target_modules}, dropout 0.05, 2 AdamW steps, random right-padded batches with "
            "labels on the last half of each row. Measured = peak RSS of the steps (VmHWM reset after loading) minus "
            "the RSS of the same process right after `import torch, transformers`."
            + (
                " Run with MALLOC_MMAP_THRESHOLD_=131072: glibc returns freed memory at once, so the peak RSS is "
                "the live-tensor peak (compare with the estimate without its allocator allowance)."
                if args.fixed_mmap_threshold
                else ""
            )
        )
        body = build_measure_table(args)
    else:
        header.append(
            f"Estimated peak GPU memory (fp16 autocast, as on a T4) at batch {args.batch_size}, r={args.rank} on "
            f"{args.target_modules}, half of the tokens trained; in parentheses with gradient checkpointing (GC). "
            f"Max micro-batch: the largest whose estimate + {ESTIMATE_ERROR_BAND:.0%} (the estimator's measured error) "
            f"fits the budget minus a 10% margin, with or without GC (at most {args.batch_size}). Recommendation: "
            "method, micro-batch x gradient accumulation (LoRA that fits only micro-batch 1 loses to QLoRA that fits "
            "more). "
            "Estimates only (no weights loaded); the formulas are in common/memory_estimator.py."
        )
        body = build_fit_table(args)
    markdown = "\n".join([*header, "", *body]) + "\n"
    print(markdown)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(markdown)
    return markdown


if __name__ == "__main__":
    main()
