"""Throughput of our train.py against TRL's SFTTrainer on the same LoRA job (A/B, a fresh process per run).

    .venv/bin/pip install -r requirements-bench.txt          # TRL, for this benchmark only
    python benchmarks/throughput.py                          # TRL's best precision probed; ours, trl, ours, trl
    python benchmarks/throughput.py --steps 2 --repeats 1    # quick check of the harness
    python benchmarks/throughput.py --skip-trl --precision no
    python benchmarks/throughput.py --trl-precision bf16     # skip TRL's precision probe
    python benchmarks/throughput.py --dropout 0 --compile --trl-compile   # each arm compiled (train.py's demo: dropout 0)

Precision: each arm at its best on this machine. Ours: train.py's `--mixed-precision auto` (it times
fp32/bf16/fp16 matmuls at the model's shapes and stores the frozen base in the fastest dtype;
`--precision` forces one). TRL: a short probe run (`--trl-probe-steps`) in fp32 and in bf16 (bf16=True,
base stored in bf16 as train.py stores it), and the faster one is kept for the timed runs.

The same job on both arms: `--model` (default SmolLM2-135M-Instruct), LoRA r=16, alpha=32, dropout 0.05 (`--dropout`) on q_proj,k_proj,v_proj, micro-batch 4 x grad accum 4, AdamW
(lr 2e-4, betas 0.9/0.999, weight decay 0.01, clipping 1.0), cosine schedule with train.py's warmup
(ceil(0.1 x steps)), seed 1234, no packing, no gradient checkpointing.

Same batches: the examples are tokenized once with `common.data.tokenize_records` (assistant-only
labels, <|im_end|> included) and put in the order train.py's LengthGroupedBatchSampler gives epoch 0.
TRL gets those `input_ids`/`labels` pre-tokenized (TRL 1.16's `assistant_only_loss=True` refuses this model:
its template has no `{% generation %}` markers and TRL cannot patch it) with a sequential sampler, so both
arms train on identical micro-batches; the script checks every step's non-padding and trained tokens agree.
Loss: both divide the summed token loss by the trained tokens of the whole effective batch (TRL via
transformers' `num_items_in_batch`, which the script checks is in use).

Measured per run, in a fresh subprocess: non-padding tokens/s over the optimizer steps after the first
(warm-up, excluded) from each arm's own step clock (ours: train_log.jsonl; TRL: a callback at each step
end); train.py's end-of-run validation and saving are not timed. Peak memory: the child's peak RSS
(its VmHWM, Linux). MFU: `common.perf.estimate_train_flops` of the timed steps / their seconds / the
FASTEST dtype's matmul rate at the model's shapes (`common.precision.resolve_precision`'s probe; the better
of a measurement before and after), whatever dtype either arm ran in.
Results: a markdown section appended to --output and the JSON next to it (throughput.json).
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import transformers as hf  # not "from transformers import": it imports bitsandbytes before common/ quiets it

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.jsonio import read_json, read_jsonl, write_json, write_jsonl  # noqa: E402  (the repo root must be on sys.path first)

# The LoRA both arms train (the configuration; also train.py's defaults).
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj"]}
FLOP_FORMULA = (
    "FLOPs/step = 4*N_body*tokens + 6*N_lora*tokens + 4*N_head*trained_tokens + 6*layers*hidden*sum(len^2) "
    "(frozen base: forward + activation grads; adapters also weight grads; LM head only on trained positions; "
    "causal attention)"
)


def describe_machine() -> str:
    """CPU model, cores, its bf16 / fp16 matmul units and memory, e.g. "AMD EPYC, 2 cores, AVX512-BF16,
    no fp16 unit, 24 GiB" (the fastest dtype differs between AMX, AVX512-BF16 and AVX512-FP16 CPUs)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} cores"
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "CPU"
    )
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    unit = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16 unit"
    fp16 = "AMX-FP16" if "amx_fp16" in flags else "AVX512-FP16" if "avx512_fp16" in flags else "no fp16 unit"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {unit}, {fp16}, {memory:.0f} GiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    from common.model import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --- the job both arms run ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, local folder or hub id")
    parser.add_argument("--train-file", default=str(REPO / "data/train.jsonl"), help="chat jsonl (messages)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "no", "fp16"],
        default="auto",
        help="train.py's --mixed-precision (auto: the fastest dtype it measures)",
    )
    parser.add_argument(
        "--trl-precision",
        choices=["best", "bf16", "no"],
        default="best",
        help="TRL's precision (best: probe fp32 and bf16, keep the faster)",
    )
    parser.add_argument("--trl-probe-steps", type=int, default=3, help="steps of each TRL probe run (1st untimed)")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="as train.py's --max-seq-len")
    parser.add_argument("--seed", type=int, default=1234, help="seed of both arms (init, data order, dropout)")
    parser.add_argument("--dropout", type=float, default=LORA["dropout"], help="LoRA dropout of both arms")
    parser.add_argument(
        "--compile", action="store_true", help="ours: train.py --compile (decoder layers compiled; pays with dropout 0)"
    )
    parser.add_argument(
        "--trl-compile", action="store_true", help="TRL: torch_compile=True (the Trainer's torch.compile)"
    )
    # --- the benchmark ---
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs, alternating ours, trl, ours, trl")
    parser.add_argument("--skip-trl", action="store_true", help="run only our train.py")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/throughput.md"), help="markdown to append")
    parser.add_argument("--machine", default=None, help="machine description (default: read from /proc/cpuinfo)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the temporary run folders (path printed)")
    parser.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)  # internal: one TRL run
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    """Fail early with a message the user can act on."""
    if args.steps < 2:
        sys.exit(f"error: --steps must be >= 2 (the first step is warm-up and not timed), got {args.steps}")
    if not 2 <= args.trl_probe_steps <= args.steps:
        sys.exit(f"error: --trl-probe-steps must be in [2, --steps {args.steps}], got {args.trl_probe_steps}")
    if min(args.repeats, args.batch_size, args.grad_accum) < 1:
        sys.exit("error: --repeats, --batch-size and --grad-accum must be >= 1")
    if not args.skip_trl and importlib.util.find_spec("trl") is None:
        sys.exit("error: TRL is not installed: .venv/bin/pip install -r requirements-bench.txt (or pass --skip-trl)")


# --- pure helpers (unit-tested in tests/test_benchmark_harness.py) ---


def plan_steps(lengths: list[int], trained: list[int], batch_size: int, grad_accum: int, steps: int, seed: int):
    """The examples of each optimizer step, as train.py's LengthGroupedBatchSampler orders epoch 0.

    Returns:
        One dict per step: {"indices", "tokens", "trained_tokens", "sum_sq_len"}.

    Raises:
        ValueError: the data has fewer full micro-batches than `steps * grad_accum`.
    """
    from common.data import LengthGroupedBatchSampler

    batches = LengthGroupedBatchSampler(lengths, batch_size, seed=seed).batches()
    full = [b for b in batches if len(b) == batch_size]
    if len(full) < steps * grad_accum:
        raise ValueError(
            f"{steps} steps x {grad_accum} x {batch_size} examples need {steps * grad_accum * batch_size} examples; "
            f"the data has {len(lengths)}: use a larger --train-file or fewer --steps"
        )
    plan = []
    for step in range(steps):
        indices = [i for batch in full[step * grad_accum : (step + 1) * grad_accum] for i in batch]
        plan.append(
            {
                "indices": indices,
                "tokens": sum(lengths[i] for i in indices),
                "trained_tokens": sum(trained[i] for i in indices),
                "sum_sq_len": sum(lengths[i] ** 2 for i in indices),
            }
        )
    return plan


def read_train_log(path: Path) -> list[dict]:
    """train.py's step records as {"step", "seconds", "tokens", "trained_tokens", "loss", "mfu"}.

    train.py logs `tokens_per_s = tokens / seconds` of each step, so seconds = tokens / tokens_per_s.
    """
    keys = ("step", "tokens", "trained_tokens", "loss", "mfu")
    return [
        {key: record[key] for key in keys} | {"seconds": record["tokens"] / record["tokens_per_s"]}
        for record in read_jsonl(path)
        if record.get("type") == "step"
    ]


def summarize_steps(steps: list[dict], warmup: int = 1) -> dict:
    """Throughput over the steps after the first `warmup` ones: sum of tokens / sum of step seconds.

    Args:
        steps: per-step dicts with "tokens", "seconds", "trained_tokens", "loss".
        warmup: leading steps left out of the timing (allocation, kernel selection, first batches).

    Returns:
        {"tokens_per_s", "timed_steps", "timed_tokens", "timed_seconds", "first_loss", "final_loss",
         "trained_tokens_per_step", "tokens_per_step"}

    Raises:
        ValueError: no step left after the warm-up.
    """
    timed = steps[warmup:]
    if not timed:
        raise ValueError(f"{len(steps)} step(s) logged; need more than the {warmup} warm-up step(s)")
    tokens, seconds = sum(s["tokens"] for s in timed), sum(s["seconds"] for s in timed)
    return {
        "tokens_per_s": tokens / seconds,
        "timed_steps": len(timed),
        "timed_tokens": tokens,
        "timed_seconds": seconds,
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "trained_tokens_per_step": [s["trained_tokens"] for s in steps],
        "tokens_per_step": [s["tokens"] for s in steps],
    }


def compute_mfu(params: dict, steps: list[dict], seconds: float, peak_flops: float) -> float:
    """Model FLOP utilization of `steps` (dicts with tokens, trained_tokens, sum_sq_len) run in `seconds`."""
    from common.perf import estimate_train_flops

    flops = sum(estimate_train_flops(params, s["tokens"], s["trained_tokens"], s["sum_sq_len"]) for s in steps)
    return flops / seconds / peak_flops


def render_throughput_report(result: dict) -> str:
    """A dated markdown section: settings, one row per run, the ours/TRL summary and the mask check."""
    c, s = result["config"], result["summary"]
    lines = [
        f"## {result['date']}: {c['model']}, {c['steps']} steps, batch {c['batch_size']} x accum {c['grad_accum']}, "
        f"ours {c['precision']}, TRL {c.get('trl_precision_kept', c.get('trl_precision', c['precision']))}"
        + f", LoRA dropout {c.get('dropout', LORA['dropout'])}"
        + (", ours compiled" if c.get("compile") else "")
        + (", TRL compiled" if c.get("trl_compile") else ""),
        "",
        f"Machine: {result['machine']}. Load average (1/5/15 min) at start {fmt_load(result['load_avg_start'])}, "
        f"at end {fmt_load(result['load_avg_end'])}. MFU denominator: the fastest dtype's measured matmul rate "
        f"at the model's shapes{fmt_probe(result.get('probe_flops'))}: {result['peak_flops'] / 1e12:.2f} TFLOP/s. "
        "Step 1 (warm-up) is not timed; tokens are non-padding tokens.",
        "",
        "| run | arm | tokens/s | timed s | peak RSS MiB | loss step 1 | final loss | MFU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in result["runs"]:
        lines.append(
            f"| {run['repeat']} | {run['arm']} | {run['tokens_per_s']:.0f} | {run['timed_seconds']:.1f} | "
            f"{run['peak_rss_mib']:.0f} | {run['first_loss']:.4f} | {run['final_loss']:.4f} | {run['mfu']:.1%} |"
        )
    lines.append("")
    for arm in ("ours", "trl"):
        if arm in s:
            a = s[arm]
            lines.append(
                f"- **{arm}** (mean of {a['runs']}): {a['tokens_per_s']:.0f} tokens/s, peak RSS {a['peak_rss_mib']:.0f} "
                f"MiB, final loss {a['final_loss']:.4f}, MFU {a['mfu']:.1%}"
            )
    if "ratio_tokens_per_s" in s:
        lines.append(
            f"- **ours / TRL**: tokens/s x{s['ratio_tokens_per_s']:.2f}, peak RSS x{s['ratio_peak_rss']:.2f}, "
            f"final loss {s['ours']['final_loss']:.4f} vs {s['trl']['final_loss']:.4f}"
        )
    dtypes = ", ".join(f"{r['arm']} {r.get('precision', '?')} / {r.get('base_dtype', '?')}" for r in result["runs"])
    shas = ", ".join(result.get("code_shas", [])) or "-"
    lines += [
        f"- Trained tokens per step (plan): {result['plan_trained_tokens']}; every run matched: "
        f"{'yes' if result['masks_match'] else 'NO'}. Non-padding tokens per step: {result['plan_tokens']}.",
        f"- Loss normalization: {result['loss_normalization']}",
        *([f"- TRL as run: {result['trl_checks']}."] if result.get("trl_checks") else []),
        *([f"- TRL precision probe: {fmt_trl_probe(result['trl_probe'])}."] if result.get("trl_probe") else []),
        f"- Precision / frozen base dtype per run: {dtypes}. train.py + common/*.py sha256 of the ours runs: {shas}"
        + (" (CHANGED between runs: compare with care)." if len(result.get("code_shas", [])) > 1 else "."),
        f"- MFU: {FLOP_FORMULA}; N_body {result['matmul_params']['body']:,}, N_lora {result['matmul_params']['lora']:,}, "
        f"N_head {result['matmul_params']['head']:,}.",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}.",
        "",
    ]
    return "\n".join(lines)


def fmt_load(load: list[float]) -> str:
    """Format a `os.getloadavg()` triple."""
    return "/".join(f"{x:.2f}" for x in load)


def fmt_probe(figures: dict | None) -> str:
    """Format the precision probe's FLOP/s per dtype as ' (fp32 0.25, bf16 0.98 TFLOP/s)'; '' without one."""
    if not figures:
        return ""
    return " (" + ", ".join(f"{name} {rate / 1e12:.2f}" for name, rate in figures.items()) + " TFLOP/s)"


def fmt_trl_probe(probe: dict) -> str:
    """Format a TRL precision probe ({"runs": {precision: tokens/s}, "kept": precision}) for the table."""
    runs = ", ".join(f"{name} {rate:.0f} tokens/s" for name, rate in probe["runs"].items())
    return f"{runs}: {probe['kept']} kept"


def pick_faster(tokens_per_s: dict[str, float]) -> str:
    """The precision with the most tokens/s (the first one listed on a tie)."""
    return max(tokens_per_s, key=tokens_per_s.get)


def trl_spec(spec: dict, precision: str) -> dict:
    """The TRL child's spec for `precision` ("no" or "bf16"): bf16 autocast with the frozen base stored in
    bf16, as train.py stores it (TRL's fastest bf16 setting), or everything in fp32."""
    return spec | {"precision": precision, "base_dtype": "bfloat16" if precision == "bf16" else "float32"}


def summarize_arms(runs: list[dict]) -> dict:
    """Mean tokens/s, MFU, final loss and the max peak RSS per arm, and the ours / TRL ratios."""
    summary = {}
    for arm in ("ours", "trl"):
        mine = [r for r in runs if r["arm"] == arm]
        if mine:
            summary[arm] = {
                "runs": len(mine),
                "tokens_per_s": sum(r["tokens_per_s"] for r in mine) / len(mine),
                "mfu": sum(r["mfu"] for r in mine) / len(mine),
                "final_loss": sum(r["final_loss"] for r in mine) / len(mine),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            }
    if "ours" in summary and "trl" in summary:
        summary["ratio_tokens_per_s"] = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
        summary["ratio_peak_rss"] = summary["ours"]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"]
    return summary


# --- the two arms, each in a fresh process ---


# Runs a script and writes its VmHWM (peak RSS, KiB) at exit. Not getrusage's ru_maxrss: subprocess
# starts children with vfork, and Linux carries the parent's peak RSS into the child's ru_maxrss at exec.
PEAK_RSS_SHIM = """
import atexit, runpy, sys

def write_peak_rss(path=sys.argv[1]):
    with open("/proc/self/status") as status:
        peak_kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(peak_kib)

atexit.register(write_peak_rss)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_child(script_and_args: list[str], log_path: Path) -> tuple[int, float]:
    """Run a Python script in a fresh process from the repo root; return (exit code, its peak RSS in MiB)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    peak_file = log_path.with_suffix(".peak_rss_kib")
    with open(log_path, "w") as log:
        command = [sys.executable, "-c", PEAK_RSS_SHIM, str(peak_file), *script_and_args]
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    return code, int(peak_file.read_text()) / 1024 if peak_file.is_file() else float("nan")


def hash_training_code() -> str:
    """Short sha256 of train.py and common/*.py, to tell whether our code changed between runs."""
    digest = hashlib.sha256()
    for path in [REPO / "train.py", *sorted((REPO / "common").glob("*.py"))]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def run_ours(args: argparse.Namespace, run_dir: Path, validation_file: Path) -> tuple[list[dict], float, dict]:
    """One train.py run; returns (step records, peak RSS MiB, {"code_sha", "base_dtype", "precision"})."""
    code_sha = hash_training_code()
    command = [
        str(REPO / "train.py"),
        "--output-dir",
        str(run_dir),
        "--model",
        args.model,
        "--train-file",
        args.train_file,
        "--validation-file",
        str(validation_file),
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--grad-accum",
        str(args.grad_accum),
        "--lr",
        str(args.lr),
        "--max-seq-len",
        str(args.max_seq_len),
        "--seed",
        str(args.seed),
        "--mixed-precision",
        args.precision,
        "--rank",
        str(LORA["rank"]),
        "--alpha",
        str(LORA["alpha"]),
        "--dropout",
        str(args.dropout),
        "--target-modules",
        ",".join(LORA["target_modules"]),
        "--warmup-ratio",
        "0.1",
        "--weight-decay",
        "0.01",
        "--adam-betas",
        "0.9",
        "0.999",
        "--max-grad-norm",
        "1.0",
        "--no-gradient-checkpointing",
        "--no-baseline",
        "--num-samples",
        "0",
        "--report-to",
        "none",
        "--early-stopping-patience",
        "0",
        "--eval-every",
        "0",
        "--save-every",
        "0",
        *(["--compile"] if args.compile else []),
    ]
    code, peak_rss = run_child(command, run_dir.with_suffix(".log"))
    if code != 0:
        sys.exit(f"error: train.py failed (exit {code}); see {run_dir.with_suffix('.log')}")
    derived = json.loads((run_dir / "config.json").read_text())["derived"]
    info = {
        "code_sha": code_sha,
        "base_dtype": derived.get("base_dtype", "float32"),  # older train.py: fp32 base
        "precision": derived.get("mixed_precision", "?"),
    }
    return read_train_log(run_dir / "train_log.jsonl"), peak_rss, info


def run_trl(args: argparse.Namespace, run_dir: Path, spec: dict) -> tuple[list[dict], float, dict]:
    """One SFTTrainer run in a child of this script; returns (step records, peak RSS MiB, child info)."""
    run_dir.mkdir(parents=True)
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps({**spec, "output_dir": str(run_dir)}))
    code, peak_rss = run_child(
        [str(Path(__file__).resolve()), "--trl-child", str(spec_file)], run_dir.with_suffix(".log")
    )
    if code != 0:
        sys.exit(f"error: the TRL run failed (exit {code}); see {run_dir.with_suffix('.log')}")
    result = read_json(run_dir / "result.json")
    return result.pop("steps"), peak_rss, result


def trl_config(spec: dict):
    """SFTConfig matching train.py's recipe: same schedule, optimizer, clipping, order, padding and dtype."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_steps"],
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.999,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as train.py
        bf16=spec["precision"] == "bf16",
        use_cpu=True,
        seed=spec["seed"],
        data_seed=spec["seed"],
        train_sampling_strategy="sequential",
        shuffle_dataset=False,  # the rows are already in train.py's order
        packing=False,
        padding_free=False,
        pad_to_multiple_of=64,  # as train.py
        max_length=spec["max_seq_len"],  # as train.py
        activation_checkpointing=False,  # TRL's default is on; train.py's LoRA default is off
        dataloader_num_workers=0,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        model_init_kwargs={"dtype": spec["base_dtype"]},  # the frozen base in the dtype train.py stores it in
        torch_compile=spec["torch_compile"],
    )


def record_micro_batch(examples: list[dict], collate: Callable[[list[dict]], dict], micro_batches: list[dict]) -> dict:
    """Collate a micro-batch with TRL's own collator and record what TRL really trains on.

    Args:
        examples: the micro-batch's rows, as the dataloader hands them to the collator.
        collate: TRL's data collator.
        micro_batches: gets one {"tokens", "trained_tokens", "sum_sq_len"} record appended.

    Returns:
        The collated batch, unchanged.
    """
    batch = collate(examples)
    lengths = batch["attention_mask"].sum(1)
    micro_batches.append(
        {
            "tokens": int(lengths.sum()),
            "trained_tokens": int((batch["labels"][:, 1:] != -100).sum()),
            "sum_sq_len": int((lengths**2).sum()),
        }
    )
    return batch


class StepClock(hf.TrainerCallback):
    """TRL's step clock: `time.perf_counter()` at the start of training and at each optimizer step's end."""

    def __init__(self, step_ends: list[float]) -> None:
        self.step_ends = step_ends

    def on_train_begin(self, *_, **__) -> None:
        self.step_ends.append(time.perf_counter())

    def on_step_end(self, *_, **__) -> None:
        self.step_ends.append(time.perf_counter())


def train_trl_child(spec_file: str) -> None:
    """The TRL arm (runs in the child process): SFTTrainer on the pre-tokenized, pre-ordered examples."""
    import datasets
    from peft import LoraConfig
    from trl import SFTTrainer

    from common.model import load_tokenizer

    spec = json.loads(Path(spec_file).read_text())
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    config = trl_config(spec)
    lora = LoraConfig(
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=spec["dropout"],
        target_modules=LORA["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=spec["model_path"],
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=load_tokenizer(spec["model_path"]),
        peft_config=lora,
    )

    micro_batches, step_ends = [], []  # what TRL really trains on, per micro-batch; its step clock
    trainer.data_collator = functools.partial(
        record_micro_batch, collate=trainer.data_collator, micro_batches=micro_batches
    )
    trainer.add_callback(StepClock(step_ends))
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    steps = []
    for step in range(spec["steps"]):
        micro = micro_batches[step * spec["grad_accum"] : (step + 1) * spec["grad_accum"]]  # Accelerate reads ahead
        steps.append(
            {
                "step": step + 1,
                "seconds": step_ends[step + 1] - step_ends[step],
                "loss": losses[step],
                **{key: sum(m[key] for m in micro) for key in ("tokens", "trained_tokens", "sum_sq_len")},
            }
        )
    result = {
        "steps": steps,
        "model_accepts_loss_kwargs": bool(trainer.model_accepts_loss_kwargs),  # True: num_items_in_batch is used
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "activation_checkpointing": bool(trainer.model.get_base_model().is_activation_checkpointing),
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "base_dtype": str(next(p for p in trainer.model.parameters() if not p.requires_grad).dtype),
        "adapter_dtype": str(next(p for p in trainer.model.parameters() if p.requires_grad).dtype),
    }
    write_json(Path(spec["output_dir"]) / "result.json", result)


def arm_package_versions() -> dict:
    """Versions of the packages that decide the speed of either arm."""
    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def prepare_inputs(args: argparse.Namespace) -> tuple[str, dict, list[dict], list[dict], dict]:
    """Probe the matmul rates, tokenize the data and plan the steps both arms train on.

    Returns:
        (model folder, the probe's FLOP/s per dtype, tokenized examples, the step plan, matmul parameters).

    Raises:
        SystemExit: the model or the data cannot be loaded.
    """
    import torch

    from common.data import DataError, load_records, tokenize_records
    from common.lora import apply_lora
    from common.model import ModelLoadError, load_config, load_model_and_tokenizer, resolve_model_path
    from common.perf import count_matmul_params
    from common.precision import resolve_precision

    try:
        model_path = resolve_model_path(args.model)
        # the same probe train.py runs, with a longer budget: every dtype's rate at the model's shapes
        probe_before = resolve_precision("auto", torch.device("cpu"), load_config(model_path), budget_s=4.0).probe_flops
        model, tokenizer = load_model_and_tokenizer(model_path)
        examples, _ = tokenize_records(load_records(args.train_file), tokenizer, args.max_seq_len)
        plan = plan_steps(
            [len(e["input_ids"]) for e in examples],
            [e["n_trained"] for e in examples],
            args.batch_size,
            args.grad_accum,
            args.steps,
            args.seed,
        )
    except (DataError, ModelLoadError, ValueError) as err:
        sys.exit(f"error: {err}")
    matmul_params = count_matmul_params(
        apply_lora(model, LORA["rank"], LORA["alpha"], LORA["dropout"], LORA["target_modules"])
    )
    del model
    gc.collect()
    return model_path, probe_before, examples, plan, matmul_params


def probe_trl_precision(args: argparse.Namespace, work: Path, spec: dict) -> tuple[str, dict]:
    """Short TRL runs in fp32 and bf16; (the faster precision, the probe's rates)."""
    rates = {}
    for precision in ("no", "bf16"):
        print(f"TRL precision probe: {precision}, {args.trl_probe_steps} steps ...", flush=True)
        probe_spec = trl_spec(spec, precision) | {"steps": args.trl_probe_steps}
        steps, _, _ = run_trl(args, work / f"trl_probe_{precision}", probe_spec)
        rates[precision] = summarize_steps(steps)["tokens_per_s"]
    trl_precision = pick_faster(rates)
    trl_probe = {"runs": rates, "kept": trl_precision}
    print(f"  {fmt_trl_probe(trl_probe)}", flush=True)
    return trl_precision, trl_probe


def run_arms(args: argparse.Namespace, work: Path, plan: list[dict], spec: dict, validation_file: Path):
    """--repeats rounds of train.py (and TRL unless --skip-trl), alternating.

    Returns:
        (one summary per run, TRL's own checks of its loss normalization).
    """
    runs, trl_info = [], {}
    for repeat in range(1, args.repeats + 1):
        for arm in ("ours",) if args.skip_trl else ("ours", "trl"):
            print(f"run {repeat} {arm} ...", flush=True)
            run_dir = work / f"{arm}_{repeat}"
            if arm == "ours":
                steps, peak_rss, info = run_ours(args, run_dir, validation_file)
                for record, planned in zip(steps, plan):  # train.py does not log sum(len^2); the plan has it
                    record["sum_sq_len"] = planned["sum_sq_len"]
            else:
                steps, peak_rss, trl_info = run_trl(args, run_dir, spec)
                info = {"base_dtype": trl_info["base_dtype"].removeprefix("torch."), "precision": spec["precision"]}
            stats = summarize_steps(steps)
            stats["mfu_timed_steps"] = steps[1:]
            runs.append({"repeat": repeat, "arm": arm, "peak_rss_mib": peak_rss, **info, **stats})
            print(
                f"  {stats['tokens_per_s']:.0f} tokens/s | peak RSS {peak_rss:.0f} MiB | "
                f"final loss {stats['final_loss']:.4f} | trained tokens/step {stats['trained_tokens_per_step']}",
                flush=True,
            )
    return runs, trl_info


def build_result(args, runs: list[dict], plan: list[dict], trl_info: dict, matmul_params: dict, probes, load_avg_start):
    """The benchmark's JSON: configuration, the peak rate (the better of two probes), every run with its MFU,
    whether both arms trained on the planned tokens, and how each normalizes the loss.

    Args:
        probes: (matmul rates before the runs, after the runs, TRL's precision probe).
    """
    probe_before, probe_after, trl_probe = probes
    probe_flops = {name: max(rate, probe_after.get(name, 0.0)) for name, rate in probe_before.items()}
    peak_dtype = max(probe_flops, key=probe_flops.get)  # the fastest dtype, whichever arm used it
    peak_flops = probe_flops[peak_dtype]  # the least disturbed of the two measurements
    for run in runs:
        run["mfu"] = compute_mfu(matmul_params, run.pop("mfu_timed_steps"), run["timed_seconds"], peak_flops)
    plan_trained = [p["trained_tokens"] for p in plan]
    plan_tokens = [p["tokens"] for p in plan]
    masks_match = all(
        r["trained_tokens_per_step"] == plan_trained and r["tokens_per_step"] == plan_tokens for r in runs
    )
    normalization = "ours: summed token loss / trained tokens of the whole effective batch (16 examples)."
    if trl_info:
        normalization += (
            " TRL: per micro-batch sum / num_items_in_batch (trained tokens of all accumulated micro-batches), "
            + ("in use: the same mean." if trl_info["model_accepts_loss_kwargs"] else "NOT in use: a mean of means.")
        )
    trl_checks = ", ".join(f"{k} {v}" for k, v in trl_info.items() if k != "model_accepts_loss_kwargs")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": args.machine or describe_machine(),
        "load_avg_start": load_avg_start,
        "load_avg_end": list(os.getloadavg()),
        "config": {k: v for k, v in vars(args).items() if k not in ("trl_child", "keep_runs")},
        "peak_flops": peak_flops,
        "peak_dtype": peak_dtype,
        "probe_flops": probe_flops,
        "probe_flops_measurements": [probe_before, probe_after],
        "trl_probe": trl_probe,
        "flop_formula": FLOP_FORMULA,
        "matmul_params": matmul_params,
        "plan_trained_tokens": plan_trained,
        "plan_tokens": plan_tokens,
        "masks_match": masks_match,
        "loss_normalization": normalization,
        "trl_checks": trl_checks,
        "code_shas": sorted({r["code_sha"] for r in runs if "code_sha" in r}),
        "runs": runs,
        "summary": summarize_arms(runs),
        "versions": arm_package_versions(),
    }


def main(argv: list[str] | None = None) -> dict | None:
    """Run the A/B benchmark; print the table; append it to --output and write the JSON next to it."""
    args = parse_args(argv)
    if args.trl_child:
        train_trl_child(args.trl_child)
        return None
    validate_args(args)
    import torch

    from common.model import load_config
    from common.precision import resolve_precision

    load_avg_start = list(os.getloadavg())
    model_path, probe_before, examples, plan, matmul_params = prepare_inputs(args)
    warmup_steps = math.ceil(0.1 * args.steps)  # train.py's default --warmup-ratio 0.1

    work = Path(tempfile.mkdtemp(prefix="throughput-"))
    validation_file = work / "validation.jsonl"  # a few records: train.py's untimed end-of-run eval stays short
    validation_file.write_text("".join((REPO / "data/validation.jsonl").read_text().splitlines(True)[:8]))
    data_file = work / "trl_train.jsonl"  # the planned examples, in step order
    rows = [
        {"input_ids": examples[i]["input_ids"], "labels": examples[i]["labels"]} for p in plan for i in p["indices"]
    ]
    write_jsonl(data_file, rows, sort_keys=False)
    spec = {
        "model_path": model_path,
        "data_file": str(data_file),
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "lr": args.lr,
        "warmup_steps": warmup_steps,
        "precision": "no",
        "seed": args.seed,
        "max_seq_len": args.max_seq_len,
        "base_dtype": "float32",
        "dropout": args.dropout,
        "torch_compile": args.trl_compile,
    }

    trl_precision, trl_probe = args.trl_precision, {}
    if not args.skip_trl and args.trl_precision == "best":  # TRL at its best here too: fp32 vs bf16, short runs
        trl_precision, trl_probe = probe_trl_precision(args, work, spec)
    spec = trl_spec(spec, trl_precision if trl_precision != "best" else "no")

    runs, trl_info = run_arms(args, work, plan, spec, validation_file)

    probe_after = resolve_precision("auto", torch.device("cpu"), load_config(model_path), budget_s=4.0).probe_flops
    result = build_result(
        args, runs, plan, trl_info, matmul_params, (probe_before, probe_after, trl_probe), load_avg_start
    )
    result["config"] |= {"warmup_steps": warmup_steps, "trl_precision_kept": spec["precision"]}
    masks_match = result["masks_match"]
    markdown = render_throughput_report(result)
    print(markdown)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a") as handle:
        handle.write(
            ("" if output.stat().st_size else "# Throughput: train.py vs TRL SFTTrainer\n\n") + markdown + "\n"
        )
    write_json(output.with_suffix(".json"), result)
    if args.keep_runs:
        print(f"run folders kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if not masks_match:
        sys.exit("error: the arms did not train on the same tokens; see the table")
    return result


if __name__ == "__main__":
    main()
