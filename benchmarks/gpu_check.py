"""The one command to run when a GPU is available: speed, MFU and memory of the T4 settings, in < 8 minutes.

    python benchmarks/gpu_check.py                              # writes benchmarks/results/gpu.md (+ gpu.json)
    python benchmarks/gpu_check.py --runs lora-fp16,qlora-fp16  # only the T4 configurations
    python benchmarks/gpu_check.py --model Qwen/Qwen2.5-0.5B-Instruct --output /tmp/gpu.md
    python benchmarks/gpu_check.py --multi-gpu                  # 2+ GPUs: FSDP2 LoRA and QLoRA vs 1 GPU

Without CUDA it prints one line and exits 0 (nothing is measured or written).

What it runs, each in a fresh process, on the default model unless `--model`:
1. The card's own dense matmul peak (`common.precision.resolve_precision` on CUDA: fp16, and bf16 from
   compute capability 8.0): the MFU denominator, as train.py measures it.
2. Training speed with train.py itself (`--max-steps --steps`, micro-batch 4 x accumulation 4, no
   baseline evaluation, no sample generation): LoRA under fp16 autocast + GradScaler (a T4's settings),
   LoRA under bf16 (compute capability >= 8.0 only), and QLoRA (4-bit NF4 + double quantization
   through bitsandbytes on CUDA, gradient checkpointing as train.py defaults) in fp16 and bf16.
   Non-padding tokens/s over the steps after the first, train.py's MFU (against the fastest dtype's
   peak), its peak `torch.cuda.max_memory_allocated`, and the GradScaler's scale after the run.
3. Memory: `common.memory_measure.measure_in_subprocess` (2 AdamW steps of train.py's loss on a random
   batch of `--memory-batch-size` x `--memory-seq-len`) against `common.memory_estimator.estimate_memory`
   for exactly those settings, the estimate profile_memory.py prints: max reserved vs the estimate
   without the CUDA context, and `max_memory_allocated` vs the estimate without the context and the
   caching-allocator allowance. The largest |ratio - 1| is the GPU's error band for
   `common.memory.ESTIMATE_ERROR_BAND`.

With `--multi-gpu` (2 or more GPUs) it runs instead, for LoRA and QLoRA, FSDP2 on 2 GPUs
(`accelerate launch --config_file accelerate_config.fsdp.yaml` / `accelerate_config.qlora_fsdp.yaml
--num_processes 2`) and the same effective batch on 1 GPU (twice the accumulation), dropout off, and
reports each run's tokens/s and peak memory per GPU and their parity: the largest |loss difference| of
any step and the largest |difference| of any final adapter weight (on a CPU with gloo: 0 and 0 in fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402  (the repo root must be on sys.path first)

from common.jsonio import read_jsonl, write_json  # noqa: E402
from common.model import DEFAULT_MODEL  # noqa: E402

# run name -> (train.py --mixed-precision, --quantization, needs bf16 tensor cores)
RUNS = {
    "lora-fp16": ("fp16", None, False),  # a T4's settings: fp16 autocast + GradScaler
    "lora-bf16": ("bf16", None, True),
    "qlora-fp16": ("fp16", "nf4", False),
    "qlora-bf16": ("bf16", "nf4", True),
}
# --multi-gpu: run name -> (accelerate config, train.py --quantization)
MULTI_GPU_RUNS = {
    "fsdp-lora": ("accelerate_config.fsdp.yaml", None),
    "fsdp-qlora": ("accelerate_config.qlora_fsdp.yaml", "nf4"),
}
TIME_BUDGET_S = 7 * 60  # a run starts only if it would end by then (as long as the slowest so far): < 8 min
LORA_FLAGS = ["--rank", "16", "--alpha", "32", "--dropout", "0.05", "--target-modules", "q_proj,k_proj,v_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- what to run ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, local folder or hub id")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--train-file", default=str(REPO / "data/train.jsonl"), help="chat jsonl for train.py")
    parser.add_argument("--validation-file", default=str(REPO / "data/validation.jsonl"), help="its first 8 rows")
    # --- training speed ---
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per train.py run (the first untimed)")
    parser.add_argument("--batch-size", type=int, default=4, help="train.py micro-batch")
    parser.add_argument("--grad-accum", type=int, default=4, help="train.py gradient accumulation")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="train.py --max-seq-len")
    # --- memory ---
    parser.add_argument("--memory-batch-size", type=int, default=4, help="batch of the memory measurement")
    parser.add_argument("--memory-seq-len", type=int, default=1024, help="padded length of the memory measurement")
    # --- output ---
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/gpu.md"), help="markdown (JSON next to it)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per subprocess before it is stopped")
    parser.add_argument("--multi-gpu", action="store_true", help="FSDP2 LoRA and QLoRA on 2 GPUs vs 1 GPU instead")
    parser.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # tests: the plumbing on a CPU
    args = parser.parse_args(argv)
    unknown = [name for name in args.runs.split(",") if name not in RUNS]
    if unknown:
        parser.error(f"--runs {','.join(unknown)}: unknown; choose from {', '.join(RUNS)}")
    if min(args.steps - 1, args.batch_size, args.grad_accum, args.memory_batch_size) < 1:
        parser.error("--steps must be >= 2 and the batch sizes and --grad-accum >= 1")
    return args


def describe_card(device: torch.device) -> dict:
    """Name, compute capability, memory and CUDA version of the card (or of the CPU in a smoke run)."""
    if device.type != "cuda":
        return {"name": "CPU (smoke run, not a GPU result)", "capability": None, "memory_gib": None, "cuda": None}
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": list(torch.cuda.get_device_capability(device)),
        "memory_gib": props.total_memory / 2**30,
        "cuda": torch.version.cuda,
    }


def summarize_train_run(run_dir: Path) -> dict:
    """train.py's numbers from a run folder: tokens/s after the first step, MFU, peak memory, loss, scaler.

    Args:
        run_dir: a train.py --output-dir.

    Returns:
        {"tokens_per_s", "mfu", "peak_mem_mb", "final_loss", "steps", "precision", "base_dtype",
         "peak_flops", "peak_flops_dtype", "loss_scale"}

    Raises:
        ValueError: fewer than 2 step records (nothing left to time after the first).
    """
    records = read_jsonl(run_dir / "train_log.jsonl")
    steps = [r for r in records if r.get("type") == "step"]
    if len(steps) < 2:
        raise ValueError(f"{run_dir}: {len(steps)} step(s) logged; need 2 or more")
    timed = steps[1:]  # the first step pays allocation and kernel selection
    seconds = sum(s["tokens"] / s["tokens_per_s"] for s in timed)
    derived = json.loads((run_dir / "config.json").read_text())["derived"]
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*/scaler.json"))
    scaler = json.loads(checkpoints[-1].read_text()) if checkpoints else None
    return {
        "tokens_per_s": sum(s["tokens"] for s in timed) / seconds,
        "mfu": sum(s["mfu"] for s in timed) / len(timed),
        "peak_mem_mb": max(s["peak_mem_mb"] for s in steps),
        "final_loss": steps[-1]["loss"],
        "steps": len(steps),
        "precision": derived.get("mixed_precision"),
        "base_dtype": derived.get("base_dtype"),
        "peak_flops": derived.get("peak_flops"),
        "peak_flops_dtype": derived.get("peak_flops_dtype"),
        "loss_scale": scaler.get("scale") if scaler else None,
    }


def run_train(args: argparse.Namespace, precision: str, quantization: str | None, run_dir: Path, val: Path) -> dict:
    """One train.py run in a fresh process; its summary, or {"error": ...} with the end of its log."""
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "--model",
        args.model,
        "--output-dir",
        str(run_dir),
        "--train-file",
        args.train_file,
        "--validation-file",
        str(val),
        "--max-steps",
        str(args.steps),
        "--subset",
        str(args.steps * args.batch_size * args.grad_accum),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        str(args.grad_accum),
        "--max-seq-len",
        str(args.max_seq_len),
        "--mixed-precision",
        precision,
        "--no-baseline",
        "--num-samples",
        "0",
        "--report-to",
        "none",
        "--early-stopping-patience",
        "0",
        *LORA_FLAGS,
    ]
    if quantization:
        command += ["--quantization", quantization]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    log = run_dir.with_suffix(".log")
    try:
        with open(log, "w") as handle:
            code = subprocess.run(
                command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=args.timeout, check=False
            ).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"train.py did not finish within {args.timeout:.0f} s"}
    if code != 0:
        return {"error": f"train.py exit {code}: " + " | ".join(log.read_text().splitlines()[-3:])}
    return summarize_train_run(run_dir)


def measure_memory(args: argparse.Namespace, precision: str, quantization: str | None, device: str) -> dict:
    """Measured peak of 2 training steps next to the estimate for exactly those settings.

    Returns:
        {"estimated_gib", "reserved_gib", "reserved_ratio", "allocated_gib", "allocated_ratio",
         "gradient_checkpointing", ...} (allocated figures only on CUDA), or {"error": ...}.
    """
    from common.memory import Setup
    from common.memory_estimator import estimate_memory
    from common.memory_measure import measure_in_subprocess
    from common.model import load_config
    from common.preflight import CUDA_CONTEXT_BYTES, GIB

    gc = quantization == "nf4"  # train.py's default: checkpointing on for QLoRA, off for LoRA
    setup = Setup(args.memory_batch_size, args.memory_seq_len, 16, "q_proj,k_proj,v_proj", quantization, precision, gc)
    setup.device, setup.compute_dtype = device, precision
    try:
        measured = measure_in_subprocess(args.model, setup, steps=2, timeout_s=args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        return {"error": str(err).splitlines()[-1] if str(err) else type(err).__name__}
    setup.trained_fraction = measured["trained_tokens"] / (args.memory_batch_size * args.memory_seq_len)
    estimate = estimate_memory(load_config(args.model), setup)
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0  # outside the allocator: not in its counters
    result = {
        "gradient_checkpointing": gc,
        "estimated_gib": estimate["total"] / GIB,
        "reserved_gib": measured["measured_bytes"] / GIB,  # CUDA: max reserved; CPU: peak RSS above the import
        "reserved_ratio": (estimate["total"] - context) / measured["measured_bytes"],
    }
    if "max_allocated_bytes" in measured:
        live = estimate["total"] - context - estimate["details"]["allocator_allowance"]
        result["allocated_gib"] = measured["max_allocated_bytes"] / GIB
        result["allocated_ratio"] = live / measured["max_allocated_bytes"]
    return result


def render_gpu_check_report(result: dict) -> str:
    """The gpu.md section: card, peaks, one row per training run, one per memory measurement."""
    card, c = result["card"], result["config"]
    peaks = ", ".join(f"{name} {rate / 1e12:.1f}" for name, rate in result["peak_flops"].items()) or "not measured"
    capability = ".".join(map(str, card["capability"])) if card["capability"] else "-"
    memory = f"{card['memory_gib']:.1f} GiB" if card["memory_gib"] else "-"
    lines = [
        f"## {result['date']}: {card['name']} (compute capability {capability}, {memory}, CUDA {card['cuda']})",
        "",
        f"Model {c['model']}. Measured dense matmul peak ({result['peak_shape']}): {peaks} TFLOP/s; MFU is against "
        "the fastest of them. Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        f"### Training: train.py, {c['steps']} steps of micro-batch {c['batch_size']} x accumulation {c['grad_accum']}"
        f" (step 1 untimed), LoRA r=16 on q,k,v",
        "",
        "| run | precision | base | tokens/s | MFU | peak allocated MiB | final loss | loss scale |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, run in result["train"].items():
        if "error" in run:
            lines.append(f"| {name} | - | - | - | - | - | - | {run['error']} |")
            continue
        scale = f"{run['loss_scale']:g}" if run["loss_scale"] else "-"
        lines.append(
            f"| {name} | {run['precision']} | {run['base_dtype']} | {run['tokens_per_s']:.0f} | {run['mfu']:.1%} | "
            f"{run['peak_mem_mb']:.0f} | {run['final_loss']:.4f} | {scale} |"
        )
    lines += [
        "",
        f"### Memory: 2 steps at {c['memory_batch_size']} x {c['memory_seq_len']} tokens vs profile_memory's estimate",
        "",
        "| run | GC | estimate GiB | max reserved GiB | estimate / reserved | max allocated GiB | estimate / allocated |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, memory_row in result["memory"].items():
        if "error" in memory_row:
            lines.append(f"| {name} | - | - | - | - | - | {memory_row['error']} |")
            continue
        allocated = memory_row.get("allocated_gib")
        lines.append(
            f"| {name} | {'on' if memory_row['gradient_checkpointing'] else 'off'} | {memory_row['estimated_gib']:.2f} | "
            f"{memory_row['reserved_gib']:.2f} | {memory_row['reserved_ratio']:.2f} | "
            + (f"{allocated:.2f} | {memory_row['allocated_ratio']:.2f} |" if allocated else "- | - |")
        )
    lines += [
        "",
        "Estimate / reserved leaves out the CUDA context (outside the allocator); estimate / allocated also the "
        "caching-allocator allowance. GPU error band of the estimate (largest |ratio - 1| above): "
        + (f"{result['error_band']:.2f}." if result["error_band"] is not None else "-."),
        *([f"Skipped: {'; '.join(result['skipped'])}."] if result["skipped"] else []),
        f"Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def error_band(memory: dict) -> float | None:
    """Largest |ratio - 1| over the memory rows (reserved and allocated ratios), None without a row."""
    ratios = [row[key] for row in memory.values() for key in ("reserved_ratio", "allocated_ratio") if key in row]
    return max(abs(r - 1) for r in ratios) if ratios else None


def multi_gpu_commands(
    args: argparse.Namespace, config: str, quantization: str | None, precision: str, work: Path, val: Path
) -> tuple[list[str], list[str]]:
    """The 1-GPU reference and the 2-GPU FSDP2 train.py commands, at the same effective batch.

    Args:
        config: the accelerate config of the FSDP run (accelerate_config.fsdp.yaml, ...).
        precision: train.py --mixed-precision for both.
        work: their run folders are work/one and work/two.
        val: the validation file.

    Returns:
        (reference command, FSDP command): micro-batch --batch-size on each GPU; the reference
        accumulates twice as many micro-batches, so every update sees the same examples.
    """
    lora_flags = list(LORA_FLAGS)
    lora_flags[lora_flags.index("--dropout") + 1] = "0"  # no dropout: each rank would draw other masks
    flags = [
        *("--model", args.model, "--train-file", args.train_file, "--validation-file", str(val)),
        *("--max-steps", str(args.steps), "--subset", str(args.steps * args.batch_size * args.grad_accum * 2)),
        *("--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len)),
        *("--mixed-precision", precision, "--no-baseline", "--num-samples", "0", "--report-to", "none"),
        *("--early-stopping-patience", "0", *lora_flags),
        *(["--quantization", quantization] if quantization else []),
    ]
    reference = [sys.executable, str(REPO / "train.py"), *flags, "--output-dir", str(work / "one")]
    reference += ["--grad-accum", str(args.grad_accum * 2)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config)]
    launch += ["--num_processes", "2", "--mixed_precision", precision]
    fsdp = [*launch, str(REPO / "train.py"), *flags, "--output-dir", str(work / "two")]
    fsdp += ["--grad-accum", str(args.grad_accum)]
    return reference, fsdp


def compare_runs(run_dir: Path, reference_dir: Path) -> dict:
    """Parity of two train.py runs that saw the same batches: per-step losses and the final adapters.

    Returns:
        {"steps", "max_abs_loss_delta", "max_rel_grad_norm_delta", "max_abs_adapter_delta"}

    Raises:
        ValueError: the runs logged different steps or saved different adapter tensors.
    """
    from safetensors.torch import load_file

    def steps(path: Path) -> dict:  # a resumed run logs replayed steps again: the last one wins
        return {r["step"]: r for r in read_jsonl(path / "train_log.jsonl") if r.get("type") == "step"}

    run, reference = steps(run_dir), steps(reference_dir)
    if sorted(run) != sorted(reference):
        raise ValueError(f"{run_dir} logged steps {sorted(run)}, {reference_dir} {sorted(reference)}")
    adapter = load_file(run_dir / "final" / "adapter_model.safetensors")
    reference_adapter = load_file(reference_dir / "final" / "adapter_model.safetensors")
    if adapter.keys() != reference_adapter.keys():
        raise ValueError(f"{run_dir}/final and {reference_dir}/final hold different adapter tensors")
    return {
        "steps": len(run),
        "max_abs_loss_delta": max(abs(run[s]["loss"] - reference[s]["loss"]) for s in run),
        "max_rel_grad_norm_delta": max(abs(run[s]["grad_norm"] / reference[s]["grad_norm"] - 1) for s in run),
        "max_abs_adapter_delta": max(
            (adapter[k].float() - reference_adapter[k].float()).abs().max().item() for k in adapter
        ),
    }


def render_multi_gpu_report(result: dict) -> str:
    """The gpu.md section of --multi-gpu: one row per run, FSDP2 on 2 GPUs against 1 GPU."""
    lines = [
        f"## {result['date']}: FSDP2 on 2 x {result['card']['name']} vs 1 GPU ({result['precision']})",
        "",
        f"Model {result['config']['model']}, {result['config']['steps']} steps, micro-batch "
        f"{result['config']['batch_size']} per GPU, LoRA r=16 on q,k,v, dropout 0.",
        "",
        "| run | 1 GPU tokens/s | 2 GPUs tokens/s | 1 GPU peak MiB | per-GPU peak MiB | max abs loss delta | "
        "max abs adapter delta |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in result["runs"].items():
        if "error" in row:
            lines.append(f"| {name} | - | - | - | - | - | {row['error']} |")
            continue
        one, two, parity = row["one"], row["two"], row["parity"]
        lines.append(
            f"| {name} | {one['tokens_per_s']:.0f} | {two['tokens_per_s']:.0f} | {one['peak_mem_mb']:.0f} | "
            f"{two['peak_mem_mb']:.0f} | {parity['max_abs_loss_delta']:.2e} | {parity['max_abs_adapter_delta']:.2e} |"
        )
    return "\n".join([*lines, "", f"Wall time {result['wall_s']:.0f} s.", ""])


def run_command(command: list[str], log: Path, timeout: float) -> str | None:
    """Run one command (HF offline, no tracker); None when it succeeded, else what went wrong."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    try:
        with open(log, "w") as handle:
            code = subprocess.run(
                command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False
            ).returncode
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout:.0f} s"
    return None if code == 0 else f"exit {code}: " + " | ".join(log.read_text().splitlines()[-3:])


def check_multi_gpu(args: argparse.Namespace) -> int:
    """--multi-gpu: FSDP2 LoRA and QLoRA on 2 GPUs against 1 GPU; print and append the markdown.

    Returns:
        The exit status: 0 (also when fewer than 2 GPUs: one line, nothing written), 1 if a run failed.
    """
    if torch.cuda.device_count() < 2 and not args.allow_cpu:
        print("gpu_check.py --multi-gpu: fewer than 2 CUDA devices here, nothing to check")
        return 0
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    precision = "bf16" if bf16_ok else "fp16" if device.type == "cuda" else "no"
    work = Path(tempfile.mkdtemp(prefix="gpu-check-fsdp-"))
    validation = work / "validation.jsonl"
    validation.write_text("".join(Path(args.validation_file).read_text().splitlines(True)[:8]))
    runs = {}
    for name, (config, quantization) in MULTI_GPU_RUNS.items():
        folder = work / name
        folder.mkdir()
        print(f"{name}: 1 GPU, then 2 GPUs ...", flush=True)
        reference, fsdp = multi_gpu_commands(args, config, quantization, precision, folder, validation)
        error = run_command(reference, folder / "one.log", args.timeout)
        error = error or run_command(fsdp, folder / "two.log", args.timeout)
        if error:
            runs[name] = {"error": error}
            continue
        one, two = summarize_train_run(folder / "one"), summarize_train_run(folder / "two")
        runs[name] = {"one": one, "two": two, "parity": compare_runs(folder / "two", folder / "one")}
    shutil.rmtree(work, ignore_errors=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "card": describe_card(device),
        "precision": precision,
        "config": vars(args),
        "runs": runs,
        "wall_s": time.perf_counter() - start,
    }
    markdown = render_multi_gpu_report(result)
    print(markdown)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a") as handle:
        handle.write(("" if output.stat().st_size else "# GPU check (benchmarks/gpu_check.py)\n\n") + markdown + "\n")
    write_json(output.with_name(output.stem + "_multi_gpu.json"), result)
    return 1 if any("error" in row for row in runs.values()) else 0


def main(argv: list[str] | None = None) -> int:
    """Run the check; print and write the markdown (and JSON next to it). Returns the exit status."""
    args = parse_args(argv)
    if args.multi_gpu:
        return check_multi_gpu(args)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check.py: no CUDA device here, nothing to check; run it on a machine with a GPU")
        return 0
    from common.model import load_config
    from common.precision import resolve_precision
    from common.run_folder import package_versions

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = describe_card(device)
    bf16_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    peak = resolve_precision("auto", device, load_config(args.model))  # train.py's MFU denominator
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    # A few records keep train.py's end-of-run evaluation short (never more than the training subset).
    validation = work / "validation.jsonl"
    records = min(8, args.steps * args.batch_size * args.grad_accum)
    validation.write_text("".join(Path(args.validation_file).read_text().splitlines(True)[:records]))
    train, memory, skipped, durations = {}, {}, [], [0.0]
    for name in args.runs.split(","):
        precision, quantization, needs_bf16 = RUNS[name]
        if needs_bf16 and not bf16_ok:
            skipped.append(f"{name} (no bf16 below compute capability 8.0)")
            continue
        if time.perf_counter() - start + max(durations) > TIME_BUDGET_S:
            skipped.append(f"{name} (it would end past the {TIME_BUDGET_S // 60}-minute budget)")
            continue
        run_start = time.perf_counter()
        print(f"{name}: train.py ...", flush=True)
        train[name] = run_train(args, precision, quantization, work / name, validation)
        print(f"{name}: memory ...", flush=True)
        memory[name] = measure_memory(args, precision, quantization, device.type)
        durations.append(time.perf_counter() - run_start)
    shutil.rmtree(work, ignore_errors=True)
    versions = package_versions()  # the same record every run folder keeps
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "card": card,
        "config": vars(args),
        "peak_flops": peak.probe_flops,
        "peak_shape": " x ".join(map(str, peak.probe_shapes[0])) if peak.probe_shapes else "-",
        "train": train,
        "memory": memory,
        "error_band": error_band(memory),
        "skipped": skipped,
        "versions": versions,
        "wall_s": time.perf_counter() - start,
    }
    markdown = render_gpu_check_report(result)
    print(markdown)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a") as handle:
        handle.write(("" if output.stat().st_size else "# GPU check (benchmarks/gpu_check.py)\n\n") + markdown + "\n")
    write_json(output.with_suffix(".json"), result)
    failed = any("error" in row for row in [*train.values(), *memory.values()])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
