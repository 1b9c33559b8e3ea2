"""LoRA / QLoRA finetuning of a chat model, with validation, checkpoints, resume and early stopping.

    python train.py                                    # embedded SmolLM2-135M-Instruct on data/train.jsonl
    accelerate launch train.py --lr 2e-4 --rank 16     # the same through Accelerate (accelerate_config.yaml)
    python train.py --quantization nf4                 # QLoRA: 4-bit NF4 base with double quantization
    python train.py --output-dir runs/demo --resume-from latest      # continue exactly where it stopped
    python train.py --config runs/demo/config.json --output-dir runs/again   # reproduce a run
    torchrun --nproc_per_node 2 train.py --max-steps 20               # 2-process data parallel (CPU: gloo)
    accelerate launch --config_file accelerate_config.fsdp.yaml train.py --num-samples 0   # FSDP2 (docs/scale-out.md)
    python train.py --train-file my.jsonl              # your data; 10% of it held out (--validation-split)
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --chat-template my.jinja   # any chat model / template

Bad input fails before the run folder is touched; then the step-0 baseline, AdamW with cosine warmup,
clipping, mixed precision and accumulation; each epoch: validation (loss, perplexity, scored sample
replies), best/, a checkpoint, early stopping; final/ and summary.json. Files: docs/run_folder.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as hf  # not "from transformers import": it imports bitsandbytes before common/ quiets it
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from common import checkpoint, fsdp, jsonio, perf, run_folder
from common.checkpoint import CheckpointError
from common.cli import load_config_defaults, load_task
from common.data import (
    DEFAULT_VALIDATION_SPLIT,
    DataError,
    LengthGroupedBatchSampler,
    collate_batch,
    hold_out_validation,
    load_records,
    read_run_record,
    tokenize_records,
)
from common.generation import generate_replies, prompt_messages
from common.lora import (
    LoraSetupError,
    apply_lora,
    count_parameters,
    lora_grad_norms,
    lora_update_ratios,
    parse_target_modules,
)
from common.loss import TrainedTokenLoss, evaluate_loss
from common.model import DEFAULT_MODEL, ModelLoadError, load_config, load_model_and_tokenizer
from common.perf import MfuMeter, count_matmul_params, gpu_utilization, peak_memory_mb
from common.precision import PrecisionChoice, enable_cpu_fp16, remeasure_peak, resolve_precision_on_main
from common.preflight import check_fits, estimate_step_bytes
from common.redact import redact_secrets, secret_env_values

REPO = Path(__file__).resolve().parent
PAD_TO = 64  # rows padded to a multiple of 64, not 8: fewer shapes; CPU 3-12% faster, 0.8 GiB less RSS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; `--config FILE` (YAML/JSON, or a run's config.json) sets the defaults first."""
    parser = argparse.ArgumentParser(description="LoRA / QLoRA finetuning of a chat model.")
    parser.add_argument("--config", help="YAML/JSON file of flag defaults (a run's config.json works)")
    # --- data and model ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, local folder or hub id")
    parser.add_argument("--train-file", default=str(REPO / "data/train.jsonl"), help="jsonl/json/csv/parquet")
    parser.add_argument("--validation-file", default=None, help=VALIDATION_FILE_HELP)
    parser.add_argument("--validation-split", type=float, default=DEFAULT_VALIDATION_SPLIT, help=SPLIT_HELP)
    parser.add_argument("--validation-split-seed", type=int, default=None, help="seed of that split (default --seed)")
    parser.add_argument("--subset", type=int, default=0, help="use only the first N training examples (0 = all)")
    parser.add_argument("--max-seq-len", type=int, default=1024, help="longer examples lose their oldest turns")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the tokenizer's own")
    # --- output ---
    parser.add_argument("--run-name", default=None, help="run name (default: a timestamp)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<run-name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the logs of an existing run folder")
    parser.add_argument("--resume-from", default=None, help="'latest' or a checkpoint folder to continue from")
    # --- lora ---
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (8-16 is the usual range)")
    parser.add_argument("--alpha", type=float, default=32, help="LoRA alpha; updates are scaled by alpha/rank")
    parser.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    parser.add_argument("--target-modules", default="q_proj,k_proj,v_proj", help="module names, or all-linear")
    parser.add_argument("--quantization", choices=["nf4"], default=None, help="nf4: QLoRA on a 4-bit base")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, help=CHECKPOINTING_HELP)
    # --- optimization ---
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per device per micro-batch")
    parser.add_argument("--effective-batch-size", type=int, default=None, help="examples per update (default 16)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per update (else derived)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    parser.add_argument("--max-steps", type=int, default=0, help="total optimizer steps (0 = set by --epochs)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps of linear warmup")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay, LoRA matrices only")
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm")
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto", help=AMP_HELP)
    parser.add_argument("--seed", type=int, default=1234, help="seed for init, data order and dropout")
    parser.add_argument("--attn-implementation", choices=["auto", "eager", "sdpa"], default="auto", help=ATTENTION_HELP)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (best: dropout 0)")
    parser.add_argument("--max-bad-steps", type=int, default=3, help="stop after more non-finite steps in a row")
    # --- evaluation, checkpoints, early stopping ---
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = epoch ends)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="validation micro-batch size")
    parser.add_argument("--no-baseline", action="store_true", help="skip the step-0 evaluation of the base")
    parser.add_argument("--num-samples", type=int, default=5, help="sample replies generated per evaluation")
    parser.add_argument("--task", default=str(REPO / "data/task.py"), help="task module scoring the samples")
    parser.add_argument("--max-new-tokens", type=int, default=400, help="tokens per sample reply")
    parser.add_argument("--early-stopping-patience", type=int, default=2, help="evaluations without improvement")
    parser.add_argument("--early-stopping-min-delta", type=float, default=0.0, help="loss drop that counts")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and every epoch end)")
    parser.add_argument("--save-total-limit", type=int, default=3, help="checkpoints kept (the newest always)")
    # --- logging ---
    parser.add_argument("--log-every", type=int, default=1, help="console line every N optimizer steps")
    parser.add_argument("--grad-log-every", type=int, default=5, help="per-layer LoRA gradient norms every N steps")
    parser.add_argument("--report-to", choices=["tensorboard", "wandb", "none"], default="tensorboard")
    parser.add_argument("--log-examples", action="store_true", help="each rank logs the example indices it trains on")
    parser.add_argument("--strict-memory", action="store_true", help="refuse to start if the estimate won't fit")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config_defaults(pre.config, parser))
    return parser.parse_args(argv)


VALIDATION_FILE_HELP = "validation data (default: validation.jsonl beside a train.jsonl, else --validation-split)"
SPLIT_HELP = "share of your --train-file held out for validation when no --validation-file is given"
CHECKPOINTING_HELP = "recompute activations in backward (default: on for QLoRA, off for LoRA)"
AMP_HELP = "auto: CPU the fastest dtype measured at startup; GPU bf16 on Ampere+, fp16 below (T4)"
ATTENTION_HELP = "auto: eager on CPU when every example is <= 512 tokens (15%% faster here), else sdpa"


def validate_args(args: argparse.Namespace, num_processes: int) -> int:
    """Check the flags (SystemExit naming the flag and what to do); fill in derived ones; return grad accum."""
    for ok, message in [
        (args.rank >= 1, f"--rank must be >= 1, got {args.rank}"),
        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (0 <= args.seed < 2**32, f"--seed must be in [0, 2**32), got {args.seed}"),
        (args.batch_size >= 1 and args.eval_batch_size >= 1, "--batch-size and --eval-batch-size must be >= 1"),
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.max_seq_len >= 16, f"--max-seq-len must be >= 16, got {args.max_seq_len}"),
        (0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}"),
        (args.weight_decay >= 0 and args.max_grad_norm > 0, "--weight-decay must be >= 0, --max-grad-norm > 0"),
        (args.max_steps >= 0, f"--max-steps must be >= 0, got {args.max_steps}"),
        (args.subset >= 0, f"--subset must be >= 0, got {args.subset}"),
        (0 < args.validation_split < 1, f"--validation-split must be in (0, 1), got {args.validation_split}"),
        (args.save_every >= 0, f"--save-every must be >= 0, got {args.save_every}"),
        (args.eval_every >= 0, f"--eval-every must be >= 0, got {args.eval_every}"),
    ]:
        if not ok:
            sys.exit(f"error: {message}")
    netrc = Path("~/.netrc").expanduser()
    if args.report_to == "wandb" and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled"):
        if not (os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())):
            sys.exit(
                "error: --report-to wandb needs a login: set WANDB_API_KEY (or run `wandb login`), "
                "or set WANDB_MODE=offline to log locally, or use --report-to tensorboard"
            )
    if fsdp.fsdp_requested() and args.num_samples:
        sys.exit(
            "error: under FSDP the model is sharded across the processes and the main process alone cannot "
            "generate sample replies; pass --num-samples 0 (evaluate.py generates from best/ afterwards)"
        )
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.quantization == "nf4"
    args.run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    if args.run_name in (".", "..") or any(c in args.run_name for c in "/\\") or not args.run_name.isprintable():
        sys.exit(
            f"error: --run-name {args.run_name!r} must be a folder name (no '/', '\\' or '..'); for a path use --output-dir"
        )
    args.output_dir = str(args.output_dir or REPO / "runs" / args.run_name)
    per_update = args.batch_size * num_processes
    if args.grad_accum is not None:
        if args.grad_accum < 1 or args.effective_batch_size not in (None, per_update * args.grad_accum):
            sys.exit(
                f"error: --grad-accum {args.grad_accum} x --batch-size {args.batch_size} x {num_processes} process(es)"
                f" must be >= 1 and equal --effective-batch-size {args.effective_batch_size}; give only one of them"
            )
        args.effective_batch_size = per_update * args.grad_accum
    args.effective_batch_size = args.effective_batch_size or 16
    if args.effective_batch_size % per_update:
        sys.exit(
            f"error: --effective-batch-size {args.effective_batch_size} is not divisible by --batch-size "
            f"{args.batch_size} x {num_processes} process(es); change one of them"
        )
    return args.effective_batch_size // per_update


KEEP_UNTIL_EXIT: list = []  # torchrun ranks: objects that must not be freed before os._exit


@dataclass
class TrainState:
    """Everything a resume needs besides tensors: saved as trainer_state.json in every checkpoint."""

    global_step: int = 0  # optimizer updates done
    micro_step: int = 0  # micro-batches done
    epoch: int = 0  # epochs completed
    batches_done_in_epoch: int = 0  # micro-batches of the current epoch (a resume skips them)
    best_val_loss: float | None = None
    best_step: int | None = None
    best_epoch: int | None = None
    evals_without_improvement: int = 0  # early stopping
    consecutive_bad_steps: int = 0  # NaN guard
    bad_steps_total: int = 0
    epoch_loss_sum: float = 0.0  # mean train loss of the epoch, also across a mid-epoch resume
    epoch_loss_steps: int = 0
    train_time_s: float = 0.0
    baseline_val_ppl: float | None = None


@dataclass
class Inputs:
    """What load_inputs() read and checked before the run folder is touched."""

    model: torch.nn.Module  # the PEFT model
    tokenizer: object
    train_examples: list[dict]
    val_examples: list[dict]
    sample_records: list[dict]  # validation records whose replies are generated at each evaluation
    resume_folder: Path | None  # the checkpoint --resume-from chose
    split: dict | None  # the validation split held out of --train-file (None with --validation-file)
    derived: dict  # tokenization stats, attention, memory verdict: recorded in config.json


def choose_attention(requested: str, device: torch.device, longest: int) -> str:
    """--attn-implementation "auto": eager on CPU while every example is <= 512 tokens (measured 15% faster at
    256-384 tokens on the default model), sdpa otherwise (eager is 2x slower at 1024). Same math."""
    if requested != "auto":
        return requested
    return "eager" if device.type == "cpu" and longest <= 512 else "sdpa"


def make_accelerator(args: argparse.Namespace, use_cpu: bool, logger) -> tuple[Accelerator, PrecisionChoice]:
    """Resolve the precision (CPU "auto" measures it) and create the Accelerator (SystemExit: unreadable model)."""
    try:
        model_config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    except ModelLoadError as err:
        sys.exit(f"error: {err}")
    # CPU "auto" times fp32/bf16/fp16 matmuls at this model's shapes (~1 s); rank 0's choice holds on every rank.
    saved = Path(args.output_dir) / "config.json"  # the run's, as the recorded split is read on a resume
    recorded = read_run_record(saved, "derived", "mixed_precision") if args.resume_from else None
    keep = args.mixed_precision == "auto" and recorded in ("no", "bf16", "fp16")
    requested = recorded if keep else args.mixed_precision
    device = torch.device("cpu" if use_cpu else "cuda")
    precision_choice = resolve_precision_on_main(requested, device, model_config, logger)
    precision_choice.reason += f"; kept from {saved} on resume (a busy CPU could measure another)" * keep
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision_choice.precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.output_dir),
    )
    enable_cpu_fp16(accelerator, precision_choice)  # Accelerate's fp16 is a silent no-op on a CPU
    try:  # Accelerate never selects FSDP on a CPU: torchrun + ACCELERATE_USE_FSDP would silently run DDP
        fsdp.enable_cpu_fsdp(accelerator)
    except ValueError as err:
        sys.exit(f"error: {err}")
    return accelerator, precision_choice


def load_inputs(args: argparse.Namespace, accelerator: Accelerator, dtype: torch.dtype, logger) -> Inputs:
    """Load and check the model, tokenizer and data before the run folder is touched (SystemExit names bad input)."""
    output_dir = Path(args.output_dir)
    try:
        run_folder.check_resume_flags(output_dir, args.resume_from, args.overwrite)
        # look now: "nothing to resume" must not leave a run folder behind
        resume_folder = checkpoint.find_resume(output_dir, args.resume_from, logger) if args.resume_from else None
        model, tokenizer = load_model_and_tokenizer(
            args.model,
            quantization=args.quantization,
            # The frozen base in the compute dtype (autocast casts it anyway); adapters, grads, AdamW states fp32.
            dtype=dtype,
            device_map={"": accelerator.device} if args.quantization else None,
            trust_remote_code=args.trust_remote_code,
            chat_template=args.chat_template,
            logger=logger,
        )
        train_records, val_records, split, both_given = load_splits(args, output_dir)
        train_examples, train_stats = tokenize_records(train_records, tokenizer, args.max_seq_len)
        val_examples, val_stats = tokenize_records(val_records, tokenizer, args.max_seq_len)
        validation_name = args.validation_file or f"the validation split held out of {args.train_file}"
        check_splits(args.train_file, train_examples, validation_name, val_examples, args.max_seq_len, both_given)
        longest = max(len(e["input_ids"]) for e in train_examples)
        attn_implementation = choose_attention(args.attn_implementation, accelerator.device, longest)
        model.set_attn_implementation(attn_implementation)
        target_modules, quantized = parse_target_modules(args.target_modules), bool(args.quantization)
        model = apply_lora(
            model, args.rank, args.alpha, args.dropout, target_modules, quantized, args.gradient_checkpointing
        )
        compiled = perf.compile_decoder_layers(model) if args.compile else 0  # training steps only (see validate)
        padded = -(-longest // PAD_TO) * PAD_TO  # the longest row as collate pads it
        memory_preflight = check_memory(model, args, accelerator.device, dtype, padded, logger)
    except (DataError, ModelLoadError, LoraSetupError, CheckpointError, run_folder.RunFolderError) as err:
        sys.exit(f"error: {err}")
    derived = {
        "attn_implementation": attn_implementation,
        "compiled_layers": compiled,
        "memory_preflight": memory_preflight,
        "tokenize_stats": {"train": vars(train_stats), "validation": vars(val_stats)},
    }
    samples = [val_records[e["index"]] for e in val_examples[: args.num_samples]]
    return Inputs(model, tokenizer, train_examples, val_examples, samples, resume_folder, split, derived)


def check_memory(model, args: argparse.Namespace, device: torch.device, dtype, seq_len: int, logger) -> str:
    """Memory pre-flight for the longest padded row `seq_len`: log the verdict (recorded in config.json), warn
    when it does not fit, or exit with --strict-memory. A model the estimate cannot read is skipped."""
    gc, seq_len = args.gradient_checkpointing, min(seq_len, args.max_seq_len)
    describe = f"batch {args.batch_size} x {seq_len} tokens ({'QLoRA' if args.quantization else 'LoRA'}, "
    describe += f"checkpointing {'on' if gc else 'off'})"
    try:
        estimate = estimate_step_bytes(model, args.batch_size, seq_len, dtype, device.type, gc, args.dropout)
        fits, message = check_fits(estimate, device.type, describe)
    except ValueError as err:
        fits, message = True, f"memory estimate skipped: {err}"
    if fits:
        logger.info(message)
        return message
    remedies = ["lower --batch-size (more accumulation keeps the effective batch)", "--max-seq-len"]
    remedies += [] if gc else ["--gradient-checkpointing"]
    remedies += [] if args.quantization else ["--quantization nf4"]
    message += f"; try {', '.join(remedies)} (see `python profile_memory.py`)"
    if args.strict_memory:
        sys.exit(f"error: {message}")
    logger.warning(f"warning: {message}")
    return message


def load_splits(args: argparse.Namespace, output_dir: Path) -> tuple[list[dict], list[dict], dict | None, bool]:
    """(train records, validation records, the held-out split or None, whether both files were given by flag:
    only then can a larger validation set mean the two were swapped)."""
    # validation.jsonl beside train.jsonl is used without a flag; otherwise a share of --train-file is held out.
    validation_given = args.validation_file is not None
    sibling = Path(args.train_file).with_name(Path(args.train_file).name.replace("train", "validation", 1))
    if not validation_given and Path(args.train_file).name.startswith("train") and sibling.is_file():
        args.validation_file = str(sibling)
    train_records, split = load_records(args.train_file), None
    if args.validation_file is None:
        config_file = output_dir / "config.json"
        recorded = read_run_record(config_file, "dataset", "validation_split") if args.resume_from else None
        split_seed = args.seed if args.validation_split_seed is None else args.validation_split_seed
        train_records, val_records, split = hold_out_validation(
            train_records, args.validation_split, split_seed, args.train_file, recorded
        )
    else:
        val_records = load_records(args.validation_file)
    train_records = train_records[: args.subset or None]  # after the split: --subset never moves it
    return train_records, val_records, split, validation_given


def check_splits(
    train_file: str, train_examples: list, validation_file: str, val_examples: list, max_seq_len: int, both_given: bool
) -> None:
    """Refuse (DataError) an empty split, or more validation than training examples when the user gave both
    files (`both_given`: they may be swapped; a default or held-out validation set never is)."""
    if not train_examples:
        raise DataError(
            f"{train_file}: no example is left after dropping those longer than --max-seq-len {max_seq_len}; raise it"
        )
    if not val_examples:
        raise DataError(
            f"{validation_file}: no example is left after dropping those longer than --max-seq-len {max_seq_len}"
        )
    if both_given and len(val_examples) > len(train_examples):
        raise DataError(
            f"--validation-file {validation_file} has more examples ({len(val_examples)}) than --train-file "
            f"{train_file} ({len(train_examples)}); the files may be swapped: exchange the values of --train-file "
            "and --validation-file, or pass a smaller --validation-file"
        )


def open_run_folder(args: argparse.Namespace, accelerator: Accelerator, trainable_params: int) -> Path | None:
    """Main process: write test, free-space check, lock, old logs cleared with --overwrite; return the lock or None."""
    output_dir, lock = Path(args.output_dir), None
    if accelerator.is_main_process:
        # 12 bytes per trainable parameter in a checkpoint (weights + 2 AdamW moments), + logs
        reserve_mb = 50 + 12 * trainable_params / 2**20 * (args.save_total_limit + 2)
        try:
            run_folder.preflight_write(output_dir, reserve_mb=reserve_mb)
            lock = run_folder.acquire_lock(output_dir)
        except run_folder.RunFolderError as err:
            sys.exit(f"error: {err}")
        if args.overwrite and not args.resume_from:
            run_folder.clear_run_logs(output_dir)
    accelerator.wait_for_everyone()
    return lock


def write_config(args, accelerator, precision_choice, inputs: Inputs, params: dict, grad_accum: int) -> dict:
    """Build the resolved configuration and schedule, write config.json (main process), return it redacted."""
    batches_per_epoch = math.ceil(len(inputs.train_examples) / (args.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    derived = {
        "grad_accum": grad_accum,
        "num_processes": accelerator.num_processes,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": math.ceil(args.warmup_ratio * total_steps),
        "mixed_precision": precision_choice.precision,
        "base_dtype": str(precision_choice.dtype).removeprefix("torch."),
        **inputs.derived,
        "device": str(accelerator.device),
        "distributed_type": str(accelerator.distributed_type),
        "trainable_params": params["trainable"],
        "total_params": params["total"],
        "trainable_pct": params["trainable_pct"],
        "train_examples": len(inputs.train_examples),
        "validation_examples": len(inputs.val_examples),
        # The MFU denominator: the FASTEST probed dtype's matmul rate here, not the chosen one's (a slow choice shows).
        "peak_flops": precision_choice.peak_flops,
        "peak_flops_dtype": precision_choice.peak_dtype,
        "precision": precision_choice.to_json(),
    }
    run_config = run_folder.build_run_config(args, derived, inputs.model, REPO)
    run_config["dataset"]["validation_split"] = inputs.split  # None when a --validation-file was used
    config = redact_secrets(run_config, secret_env_values())
    if accelerator.is_main_process:
        jsonio.write_json(Path(args.output_dir) / "config.json", config)
    return config


def log_setup(logger: logging.Logger, args: argparse.Namespace, config: dict, inputs: Inputs, precision_choice) -> None:
    """The run's shape in three or four lines of train.log."""
    derived, stats = config["derived"], config["derived"]["tokenize_stats"]["train"]
    logger.info(
        f"trainable params {derived['trainable_params']:,} / {derived['total_params']:,} "
        f"({derived['trainable_pct']:.3f}%) | {derived['train_examples']} train / {derived['validation_examples']} "
        f"validation examples ({stats['truncated_history']} truncated, {stats['dropped_overlong']} dropped > "
        f"{args.max_seq_len} tokens)"
    )
    logger.info(
        f"{derived['num_processes']} process(es) x batch {args.batch_size} x grad accum {derived['grad_accum']} = "
        f"effective batch {args.effective_batch_size} | {derived['steps_per_epoch']} steps/epoch, {derived['total_steps']} "
        f"total, {derived['warmup_steps']} warmup | {derived['mixed_precision']} on {derived['device']}"
    )
    logger.info(precision_choice.describe())  # the probe's figures, the choice and the MFU denominator
    if (split := inputs.split) is not None:
        logger.info(
            f"validation: {split['validation_examples']} of the {split['source_examples']} examples of "
            f"{args.train_file} held out (--validation-split {split['fraction']}, seed {split['seed']}; recorded in "
            "config.json); pass --validation-file to validate on a file of your own"
        )


def make_dataloaders(inputs: Inputs, args) -> tuple[DataLoader, LengthGroupedBatchSampler, DataLoader]:
    """(length-grouped shuffled training dataloader, its batch sampler, length-sorted validation dataloader)."""
    lengths = [len(e["input_ids"]) for e in inputs.train_examples]
    train_sampler = LengthGroupedBatchSampler(lengths, args.batch_size, seed=args.seed)
    # Own generator: a DataLoader iterator then never draws from the global RNG (a resume's dropout masks hold).
    generator = torch.Generator().manual_seed(args.seed)
    collate = functools.partial(collate_batch, pad_token_id=inputs.tokenizer.pad_token_id, pad_to_multiple_of=PAD_TO)

    def collate_with_index(batch: list[dict]) -> dict:  # the example indices let --log-examples audit the sharding
        return collate(batch) | {"index": torch.tensor([e["index"] for e in batch])}

    train_dataloader = DataLoader(
        inputs.train_examples, batch_sampler=train_sampler, collate_fn=collate_with_index, generator=generator
    )
    val_sorted = sorted(inputs.val_examples, key=lambda e: len(e["input_ids"]))  # similar lengths share a batch
    eval_dataloader = DataLoader(val_sorted, batch_size=args.eval_batch_size, collate_fn=collate)
    return train_dataloader, train_sampler, eval_dataloader


def start_epoch(state: TrainState, epoch: int, run: Run, train_dataloader, train_sampler) -> Iterator[list[dict]]:
    """Reset the epoch's loss sums (unless resuming mid-epoch); return its micro-batches past the batches done,
    one optimizer update's window (grad_accum of them; the epoch's last may be shorter) at a time."""
    skip = state.batches_done_in_epoch  # > 0 only when resuming mid-epoch
    if not skip:  # a new epoch; a mid-epoch resume keeps the sums of the steps before its checkpoint
        state.epoch_loss_sum, state.epoch_loss_steps = 0.0, 0
    epoch_dataloader = run.accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
    # Both calls matter: iter() re-applies Accelerate's own epoch counter to the sampler (a fresh
    # skip-dataloader would restart it at 0), and a multi-process shard does not forward set_epoch.
    epoch_dataloader.set_epoch(epoch)
    train_sampler.set_epoch(epoch)
    batches, grad_accum = iter(epoch_dataloader), run.config["derived"]["grad_accum"]
    return iter(lambda: list(itertools.islice(batches, grad_accum)), [])  # until a window comes back empty


@dataclass
class Run:
    """What a run fixes once and every stage uses: flags, Accelerate objects, model, evaluation, logs."""

    args: argparse.Namespace
    accelerator: Accelerator
    model: torch.nn.Module  # the PEFT model (saved to best/, final/, checkpoints)
    loss_model: torch.nn.Module  # the prepared TrainedTokenLoss around it
    tokenizer: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    eval_dataloader: DataLoader
    samples: list[dict]  # validation records whose replies are generated (the main process only)
    task: object  # the --task module that scores those replies
    config: dict  # the resolved configuration, config.json (copied into best/ and checkpoints)
    logger: logging.Logger

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    def log_jsonl(self, name: str, record: dict) -> None:
        """Append `record` to output_dir/name on the main process."""
        if self.accelerator.is_main_process:
            jsonio.append_jsonl(self.output_dir / name, record)


def forward_backward(run: Run, batches: list[dict], state: TrainState, loss_scale: float) -> torch.Tensor:
    """Forward and backward every micro-batch of one update; return this rank's float64 window sums
    [summed token loss, trained tokens, tokens, sum of squared lengths]."""
    accelerator, sums = run.accelerator, torch.zeros(4, dtype=torch.float64, device=run.accelerator.device)
    for i, batch in enumerate(batches):
        example_index = batch.pop("index")
        if run.args.log_examples:
            record = {"micro_step": state.micro_step + 1, "epoch": state.epoch, "index": example_index.tolist()}
            jsonio.append_jsonl(run.output_dir / f"examples_rank{accelerator.process_index}.jsonl", record)
        # DDP all-reduces the gradients in the backward of the window's last micro-batch only.
        with contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(run.loss_model):
            row_losses, row_counts = run.loss_model(**batch)
            loss_sum, n_trained = row_losses.sum(), row_counts.sum()
            accelerator.backward(loss_sum / loss_scale)
        lengths = batch["attention_mask"].sum(1).double()
        sums += torch.stack([loss_sum.detach().double(), n_trained.double(), lengths.sum(), (lengths**2).sum()])
        state.micro_step += 1
        state.batches_done_in_epoch += 1
    return sums


def clip_gradients(run: Run, trainable: list, rescale: float) -> float:
    """Multiply the accumulated gradients by `rescale` (to the per-token mean), clip them, return their norm."""
    torch._foreach_mul_([p.grad for p in trainable if p.grad is not None], rescale)
    return float(fsdp.clip_grad_norm_(run.accelerator, trainable, run.args.max_grad_norm))  # FSDP + fp16: see there


def optimizer_step(state: TrainState, loss: float, grad_norm: float, run: Run) -> tuple[bool, str]:
    """Step unless the loss or gradient norm is not finite (the NaN guard), advance the schedule, clear the gradients,
    count the step; return (whether it stepped, why the run must stop: > --max-bad-steps skipped in a row, or "")."""
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite or run.accelerator.scaler is not None:
        run.optimizer.step()  # under fp16 the GradScaler skips an inf/NaN update by itself
    stepped = finite and not run.optimizer.step_was_skipped
    if stepped:
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    if finite:
        state.consecutive_bad_steps = 0
        state.epoch_loss_sum += loss
        state.epoch_loss_steps += 1
        return stepped, ""
    state.consecutive_bad_steps += 1
    state.bad_steps_total += 1
    reason = f"non-finite loss {loss} or grad norm {grad_norm}: update skipped"
    run.log_jsonl("train_log.jsonl", {"type": "bad_step", "step": state.global_step, "reason": reason})
    run.logger.warning(f"step {state.global_step} | {reason} ({state.consecutive_bad_steps} in a row)")
    if state.consecutive_bad_steps <= run.args.max_bad_steps:
        return False, ""
    return False, (
        f"{state.consecutive_bad_steps} non-finite steps in a row (> --max-bad-steps {run.args.max_bad_steps}); "
        "lower --lr or check the data"
    )


@dataclass
class StepStats:
    """What one optimizer update measured, summed over its micro-batches and all ranks."""

    loss: float  # mean over the update's trained tokens
    grad_norm: float
    stepped: bool  # False: skipped by the NaN guard or the GradScaler
    tokens: float  # non-padding tokens
    trained: float  # tokens with a label
    sum_sq: float  # sum of squared sequence lengths (attention FLOPs)
    seconds: float  # the update's wall time


def log_step(state: TrainState, epoch: float, stats: StepStats, layer_norms: dict, meter: MfuMeter, run: Run) -> None:
    """The update's record (loss, schedule, gradient, throughput, MFU never > 100%, memory) to train_log.jsonl
    and the tracker, its per-layer norms to grad_log.jsonl, its console line every --log-every steps."""
    record = {
        "type": "step",
        "step": state.global_step,
        "epoch": epoch,
        "loss": stats.loss,
        "lr": run.lr_scheduler.get_last_lr()[0],
        "grad_norm": stats.grad_norm,
        "skipped": not stats.stepped,
        "tokens": int(stats.tokens),
        "trained_tokens": int(stats.trained),
        "tokens_per_s": stats.tokens / stats.seconds,
        "mfu": meter.mfu(stats.tokens, stats.trained, stats.sum_sq, stats.seconds),
        "peak_flops": meter.peak_flops,
        "peak_mem_mb": peak_memory_mb(run.accelerator.device),
        "gpu_util": gpu_utilization(run.accelerator.device),
        "elapsed_s": state.train_time_s,
    }
    run.log_jsonl("train_log.jsonl", record)
    if layer_norms:
        run.log_jsonl("grad_log.jsonl", {"step": state.global_step, "norms": layer_norms})
    run.accelerator.log(
        {f"train/{k}": v for k, v in record.items() if isinstance(v, int | float)}, step=state.global_step
    )
    if state.global_step % run.args.log_every == 0:
        run.logger.info(
            f"step {record['step']} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tok/s | mfu {record['mfu'] or 0:.1%} | "
            f"{record['peak_mem_mb']:.0f} MiB"
        )


def write_samples(run: Run, path: Path) -> dict:
    """Generate a reply for each sample prompt, write them to `path` and score them with the task module; return
    {"sample_n": replies scored, "sample_<key>": the mean of each key of `task.score_reply(reply, record)` over
    them}: a run whose loss falls while its replies still miss says so in its logs."""
    prompts = [prompt_messages(r["messages"]) for r in run.samples]
    with run.accelerator.autocast():
        replies = generate_replies(run.model, run.tokenizer, prompts, len(prompts), run.args.max_new_tokens)
    samples = [
        {"id": r.get("id"), "prompt_messages": p, "reference": r["messages"][len(p)]["content"], "generated": g}
        for r, p, g in zip(run.samples, prompts, replies, strict=True)
    ]
    path.parent.mkdir(exist_ok=True)
    jsonio.write_jsonl(path, samples, sort_keys=False)
    scores = [s for s in map(run.task.score_reply, replies, run.samples) if s is not None]
    keys = dict.fromkeys(k for s in scores for k in s)
    return {"sample_n": len(scores)} | {f"sample_{k}": sum(s.get(k, 0.0) for s in scores) / len(scores) for k in keys}


def validate(state: TrainState, epoch: float, run: Run, baseline: bool = False) -> None:
    """Validation loss and scored samples at `epoch` (fractional); keep best/ when it improved (never for the
    step-0 `baseline`); count toward early stopping."""
    args, accelerator, model, step = run.args, run.accelerator, run.model, state.global_step
    with perf.eager_modules(model):  # --compile's layers: eval mode and a KV cache would compile them again
        metrics = evaluate_loss(run.loss_model, run.eval_dataloader, accelerator, seed=args.seed)
        if accelerator.is_main_process and run.samples:
            metrics |= write_samples(run, run.output_dir / "samples" / f"step_{step:06d}.jsonl")
    best = state.best_val_loss
    improved = not baseline and (best is None or metrics["val_loss"] < best - args.early_stopping_min_delta)
    record = {"step": step, "epoch": epoch, "baseline": baseline, "is_best": improved, **metrics}
    run.log_jsonl("eval_log.jsonl", record)
    accelerator.log(
        {f"eval/{k}": v for k, v in record.items() if isinstance(v, int | float) and k != "step"}, step=step
    )
    scored = ", ".join(f"{k[7:]} {v:.0%}" for k, v in record.items() if k.startswith("sample_") and k != "sample_n")
    run.logger.info(
        f"eval step {step} | val loss {metrics['val_loss']:.4f} ± {metrics['val_loss_ci95']:.4f} | "
        f"ppl {metrics['val_ppl']:.3f} | {metrics['eval_time_s']:.1f}s{f' | samples: {scored}' if scored else ''}"
        + (" | baseline" if baseline else " | new best" if improved else "")
    )
    if baseline:
        state.baseline_val_ppl = metrics["val_ppl"]
    elif improved:
        state.best_val_loss, state.best_step, state.best_epoch = metrics["val_loss"], step, math.ceil(epoch)
        state.evals_without_improvement = 0
        adapter = fsdp.gather_sharded_adapter(model)  # FSDP: every rank gathers, rank 0 writes
        if accelerator.is_main_process:
            extra = {"metrics.json": record, "trainer_state.json": asdict(state), "config.json": run.config}
            checkpoint.save_adapter_folder(model, run.tokenizer, run.output_dir / "best", args.model, extra, adapter)
    else:
        state.evals_without_improvement += 1


def save_checkpoint(state: TrainState, run: Run) -> None:
    """checkpoints/step_XXXXXX (every rank takes part), then rotate the oldest beyond --save-total-limit."""
    checkpoints = run.output_dir / "checkpoints"
    folder = checkpoints / f"step_{state.global_step:06d}"
    checkpoint.save(run.accelerator, run.model, run.optimizer, run.lr_scheduler, asdict(state), folder, run.config)
    if run.accelerator.is_main_process:
        checkpoint.rotate(checkpoints, run.args.save_total_limit)


def train_loop(state: TrainState, run: Run, train_dataloader, train_sampler, meter: MfuMeter) -> tuple[str, str]:
    """Train until the epochs or --max-steps are done, early stopping, or too many bad steps; return (status,
    stop reason), status "completed", "max_steps", "early_stopped" or "stopped_bad_steps". One iteration of the
    inner loop is one optimizer update (global_step); micro_step counts micro-batches."""
    args, accelerator, model = run.args, run.accelerator, run.model
    num_processes, total_steps = accelerator.num_processes, run.config["derived"]["total_steps"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    # --- the token-normalized loss: set up here and nowhere else ---
    # Each micro-batch backpropagates the SUM of its trained tokens' losses divided by `loss_scale`, a constant
    # (max_seq_len x batch_size) that keeps the summed loss and its gradients in fp16 range. After the update's
    # window, clip_gradients multiplies the gradients by `rescale`: the gradient of the MEAN loss over every
    # trained token of the update (all its micro-batches, all ranks; DDP averages over the ranks, hence
    # x num_processes), not a mean of batch means.
    loss_scale = args.max_seq_len * args.batch_size
    status, stop_reason = "completed", ""
    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process)
    run.loss_model.train()
    clock = time.perf_counter() - state.train_time_s
    for epoch in range(state.epoch, args.epochs):
        epoch_start = step_start = time.perf_counter()
        for batches in start_epoch(state, epoch, run, train_dataloader, train_sampler):
            sums = forward_backward(run, batches, state, loss_scale)
            loss_sum, trained, tokens, sum_sq = accelerator.reduce(sums, "sum").tolist()  # one host sync
            loss = loss_sum / max(trained, 1.0)
            grad_norm = clip_gradients(run, trainable, loss_scale * num_processes / max(trained, 1.0))
            layer_norms = lora_grad_norms(model) if (state.global_step + 1) % max(args.grad_log_every, 1) == 0 else {}
            progress.update(1)
            # NaN guard: a non-finite loss or gradient skips the update; too many in a row stop the run.
            stepped, stop_reason = optimizer_step(state, loss, grad_norm, run)
            if stop_reason:
                return "stopped_bad_steps", stop_reason
            seconds, step_start = time.perf_counter() - step_start, time.perf_counter()
            state.train_time_s = time.perf_counter() - clock
            epoch_done = epoch + state.batches_done_in_epoch / len(train_dataloader)
            stats = StepStats(loss, grad_norm, stepped, tokens, trained, sum_sq, seconds)
            log_step(state, epoch_done, stats, layer_norms, meter, run)
            if args.eval_every and state.global_step % args.eval_every == 0:
                validate(state, epoch_done, run)
            if args.save_every and state.global_step % args.save_every == 0:
                save_checkpoint(state, run)
            if state.global_step >= total_steps and state.batches_done_in_epoch < len(train_dataloader):
                status, stop_reason = "max_steps", f"reached --max-steps {args.max_steps}"
                break
        # --- end of the epoch (or of --max-steps): evaluate, checkpoint, maybe stop early ---
        if status != "max_steps":  # the epoch is done: log its mean training loss
            seconds = time.perf_counter() - epoch_start
            state.epoch, state.batches_done_in_epoch = epoch + 1, 0
            mean_loss = state.epoch_loss_sum / max(state.epoch_loss_steps, 1)
            record = {"type": "epoch", "epoch": epoch + 1, "step": state.global_step, "mean_train_loss": mean_loss}
            run.log_jsonl("train_log.jsonl", record | {"epoch_time_s": seconds})
            run.logger.info(f"epoch {epoch + 1} | mean train loss {mean_loss:.4f} | {seconds:.1f}s")
        validate(state, state.epoch + state.batches_done_in_epoch / len(train_dataloader), run)
        save_checkpoint(state, run)
        patience = args.early_stopping_patience
        if status == "completed" and patience and state.evals_without_improvement >= patience:
            status = "early_stopped"
            stop_reason = (
                f"validation loss did not improve by more than {args.early_stopping_min_delta} for {patience} "
                f"evaluations (best: step {state.best_step})"
            )
            run.logger.info(f"early stopping: {stop_reason}")
        if status != "completed" or state.global_step >= total_steps:
            break
    progress.close()
    return status, stop_reason


def finish(state: TrainState, status: str, stop_reason: str, run: Run, lock) -> dict:
    """Write final/ (unless the run diverged), update_ratios.json and summary.json, release the lock; return the
    summary. SystemExit after that when the run stopped on too many non-finite steps."""
    accelerator, model, num_processes = run.accelerator, run.model, run.accelerator.num_processes
    # FSDP: no rank holds the adapter whole; compare the full tensors every rank gathers (and rank 0 saves).
    adapter = fsdp.gather_sharded_adapter(model)
    trainable = list(adapter.values()) if adapter is not None else [p for p in model.parameters() if p.requires_grad]
    in_sync = run_folder.check_ranks_in_sync(trainable, accelerator)
    if num_processes > 1:
        run.logger.info(f"adapter weights identical on all {num_processes} ranks: {in_sync}")
    # Under FSDP the ratios need the sharded base weights: every rank computes them, rank 0 writes.
    ratios = lora_update_ratios(model) if accelerator.is_main_process or adapter is not None else None
    if accelerator.is_main_process and status != "stopped_bad_steps":
        extra = {"trainer_state.json": asdict(state), "config.json": run.config}
        checkpoint.save_adapter_folder(model, run.tokenizer, run.output_dir / "final", run.args.model, extra, adapter)
        jsonio.write_json(run.output_dir / "update_ratios.json", ratios)
    summary = run_folder.write_run_summary(
        run.output_dir, status, stop_reason, asdict(state), count_parameters(model), accelerator, in_sync
    )
    run.logger.info(
        f"done: {status}{f' ({stop_reason})' if stop_reason else ''} | best val ppl {summary['best_val_ppl']} "
        f"at step {summary['best_step']} (baseline {summary['baseline_val_ppl']}) | {summary['train_time_s']:.0f}s"
    )
    accelerator.end_training()
    run_folder.release_lock(lock)
    if status == "stopped_bad_steps":
        sys.exit(f"error: training stopped: {stop_reason}")
    return summary


def prepare_run(args, accelerator: Accelerator, inputs: Inputs, config: dict, logger) -> tuple[Run, DataLoader, object]:
    """Optimizer, schedule, dataloaders and the loss model prepared by Accelerate: (Run, train dataloader, sampler)."""
    model, derived = inputs.model, config["derived"]
    # AdamW; weight decay on the LoRA A/B matrices only, not on biases or norms (if any were trainable)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in trainable if p.ndim >= 2], [p for p in trainable if p.ndim < 2]
    param_groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=tuple(args.adam_betas))
    # Not passed to prepare(): Accelerate would step it once per process; we step it once per update.
    lr_scheduler = hf.get_cosine_schedule_with_warmup(optimizer, derived["warmup_steps"], derived["total_steps"])
    train_dataloader, train_sampler, eval_dataloader = make_dataloaders(inputs, args)
    loss_model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        TrainedTokenLoss(model), optimizer, train_dataloader, eval_dataloader
    )
    if accelerator.num_processes > 1:
        KEEP_UNTIL_EXIT.extend([accelerator, loss_model])  # the DDP model must outlive main(): see exit_distributed
    if fsdp.is_sharded(model):
        logger.info(fsdp.describe_sharding(loss_model, accelerator.num_processes))
    run = Run(args, accelerator, model, loss_model, inputs.tokenizer, optimizer, lr_scheduler, eval_dataloader,
              inputs.sample_records, load_task(args.task), config, logger)  # fmt: skip
    return run, train_dataloader, train_sampler


def main(argv: list[str] | None = None) -> dict:
    """Train and return the run summary (also written to summary.json)."""
    args = parse_args(argv)
    # cpu=True on a machine without CUDA lets `torchrun --nproc_per_node N` run as MULTI_CPU (gloo).
    use_cpu = not torch.cuda.is_available()
    grad_accum = validate_args(args, PartialState(cpu=use_cpu).num_processes)
    logger = run_folder.setup_logging(None, PartialState().is_main_process)
    accelerator, precision_choice = make_accelerator(args, use_cpu, logger)
    set_seed(args.seed)  # python, numpy, torch and every accelerator's generators
    inputs = load_inputs(args, accelerator, precision_choice.dtype, logger)  # bad input fails here
    params = count_parameters(inputs.model)
    lock = open_run_folder(args, accelerator, params["trainable"])
    logger = run_folder.setup_logging(Path(args.output_dir) / "train.log", accelerator.is_main_process)
    config = write_config(args, accelerator, precision_choice, inputs, params, grad_accum)
    log_setup(logger, args, config, inputs, precision_choice)
    run, train_dataloader, train_sampler = prepare_run(args, accelerator, inputs, config, logger)
    # MFU against the probed peak; a step that beats it has the peak measured again (never > 100%)
    meter = MfuMeter(count_matmul_params(run.model), precision_choice.peak_flops)
    meter.remeasure = functools.partial(remeasure_peak, precision_choice, run.model.config)
    state, folder = TrainState(), inputs.resume_folder
    if folder is not None:  # the checkpoint's trainer state, weights, optimizer, schedule and RNGs
        try:
            state = TrainState(**checkpoint.load(accelerator, run.model, run.optimizer, run.lr_scheduler, folder))
        except CheckpointError as err:
            sys.exit(f"error: {err}")
        logger.info(
            f"resumed from {folder}: step {state.global_step}, epoch {state.epoch + 1}, batch {state.batches_done_in_epoch}"
        )
    # TensorBoard / wandb get the scalar flags, secrets redacted: a path or a --config value may hold a token
    scalars = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}
    tracker_config = redact_secrets(scalars, secret_env_values())
    accelerator.init_trackers("tensorboard" if args.report_to == "tensorboard" else args.run_name, tracker_config)
    if not args.resume_from and not args.no_baseline:
        validate(state, 0.0, run, baseline=True)
    status, stop_reason = train_loop(state, run, train_dataloader, train_sampler, meter)
    return finish(state, status, stop_reason, run, lock)


def exit_distributed(code: int | str | None) -> None:
    """End a torchrun rank without freeing the DDP model or the interpreter; `code` as `sys.exit` takes it.

    Freeing the DDP reducer destroys the gloo process group, whose destructor joins the gloo worker threads
    while holding the GIL; a worker whose last job was an all-gather needs the GIL to free that job's tensors:
    deadlock (py-spy, torch 2.13: ~1 in 4 two-process runs hung after "done"). So main() keeps the prepared
    model alive in KEEP_UNTIL_EXIT and the rank leaves with os._exit once logs, checkpoints and trackers are closed."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        main()
    else:
        try:
            main()
        except SystemExit as stop:
            exit_distributed(stop.code)
        except BaseException:
            traceback.print_exc()
            exit_distributed(1)
        exit_distributed(0)
