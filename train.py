"""LoRA / QLoRA finetuning of a chat model, with validation, checkpoints, resume and early stopping.

    python train.py                                    # embedded SmolLM2-135M-Instruct on data/train.jsonl
    accelerate launch train.py --lr 2e-4 --rank 16     # the same through Accelerate (accelerate_config.yaml)
    python train.py --quantization nf4                 # QLoRA: 4-bit NF4 base with double quantization
    python train.py --output-dir runs/demo --resume-from latest      # continue exactly where it stopped
    python train.py --config runs/demo/config.json --output-dir runs/again   # reproduce a run
    torchrun --nproc_per_node 2 train.py --max-steps 20               # 2-process data parallel (CPU: gloo)
    python train.py --train-file my.jsonl              # your data; 10% of it held out (--validation-split)
    python train.py --model Qwen/Qwen2.5-0.5B-Instruct --chat-template my.jinja   # any chat model / template

In order: validate flags; load the model and tokenize the data (assistant-only labels) before the
run folder is touched, so bad input never leaves a half-written run; create the run folder (lock,
write test, config.json); evaluate the untouched base (the step-0 baseline); train with AdamW,
cosine warmup, clipping, mixed precision and gradient accumulation; after each epoch evaluate
(loss, perplexity, sample replies), keep best/ and a checkpoint, and stop early when validation
stops improving; finally write final/ and summary.json. Files: docs/run_folder.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from common import run as run_utils
from common.artifacts import redact_secrets, secret_env_values
from common.data import (
    DEFAULT_VALIDATION_SPLIT,
    DataError,
    LengthGroupedBatchSampler,
    collate_batch,
    hold_out_validation,
    load_records,
    read_recorded_split,
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
from common.metrics import score_samples
from common.model import DEFAULT_MODEL, ModelLoadError, load_config, load_model_and_tokenizer
from common.precision import enable_cpu_fp16, resolve_precision_on_main
from common.seed import seed_everything
from common.training import (
    CheckpointError,
    TrainedTokenLoss,
    count_matmul_params,
    estimate_train_flops,
    evaluate_loss,
    write_json,
)

REPO = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; `--config FILE` (YAML/JSON, or a run's config.json) sets the defaults first."""
    parser = argparse.ArgumentParser(description="LoRA / QLoRA finetuning of a chat model.")
    parser.add_argument("--config", help="YAML/JSON file of flag defaults (a run's config.json works)")
    # --- data and model ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help="embedded alias, local folder or hub id")
    parser.add_argument("--train-file", default=str(REPO / "data/train.jsonl"), help="jsonl/json/csv/parquet")
    parser.add_argument("--validation-file", default=None,
                        help="validation data (default: data/validation.jsonl for the demo data, else --validation-split)")  # fmt: skip
    parser.add_argument("--validation-split", type=float, default=DEFAULT_VALIDATION_SPLIT,
                        help="share of your --train-file held out for validation when no --validation-file is given")  # fmt: skip
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
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="recompute activations in backward (default: on for QLoRA, off for LoRA)")  # fmt: skip
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
    parser.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                        help="auto: CPU the fastest dtype measured at startup; GPU bf16 on Ampere+, fp16 below (T4)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1234, help="seed for init, data order and dropout")
    parser.add_argument("--attn-implementation", choices=["auto", "eager", "sdpa"], default="auto",
                        help="auto: eager on CPU when every example is <= 512 tokens (15%% faster here), else sdpa")  # fmt: skip
    parser.add_argument("--max-bad-steps", type=int, default=3, help="stop after more non-finite steps in a row")
    # --- evaluation, checkpoints, early stopping ---
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = epoch ends)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="validation micro-batch size")
    parser.add_argument("--no-baseline", action="store_true", help="skip the step-0 evaluation of the base")
    parser.add_argument("--num-samples", type=int, default=5, help="sample replies generated per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=320, help="tokens per sample reply (a worksheet ~250)")
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
    parser.add_argument("--fault-inject", default="", help="tests only: loss:3,grad:5,stop:11")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**run_utils.load_config_defaults(pre.config, parser))
    return parser.parse_args(argv)


def validate_args(args: argparse.Namespace, num_processes: int) -> int:
    """Check the flags; fill in derived ones; return the gradient accumulation steps.

    Raises:
        SystemExit: naming the flag and what to do.
    """
    for ok, message in [
        (args.rank >= 1, f"--rank must be >= 1, got {args.rank}"),
        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
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
    if args.report_to == "wandb" and os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled"):
        netrc = Path("~/.netrc").expanduser()
        has_login = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
        if not has_login:
            sys.exit("error: --report-to wandb needs a login: set WANDB_API_KEY (or run `wandb login`), "
                     "or set WANDB_MODE=offline to log locally, or use --report-to tensorboard")  # fmt: skip
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.quantization == "nf4"
    args.run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    if args.run_name in (".", "..") or any(c in args.run_name for c in "/\\") or not args.run_name.isprintable():
        sys.exit(f"error: --run-name {args.run_name!r} must be a folder name (no '/', '\\' or '..'); "
                 "for a path use --output-dir")  # fmt: skip
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


def choose_attention(requested: str, device: torch.device, longest: int) -> str:
    """Resolve --attn-implementation: "auto" is eager on CPU while the longest example (`longest`
    tokens) is <= 512, sdpa otherwise. Both compute the same attention. Measured on the default model,
    bf16, batch 4, this 2-core CPU: eager 794 vs sdpa 680 tok/s at 256 tokens, 749 vs 651 at 384, equal
    at 512, and 205 vs 464 at 1024 (eager materializes the batch x heads x len^2 probabilities)."""
    if requested != "auto":
        return requested
    return "eager" if device.type == "cpu" and longest <= 512 else "sdpa"


def main(argv: list[str] | None = None) -> dict:
    """Train and return the run summary (also written to summary.json)."""
    args = parse_args(argv)
    # cpu=True on a machine without CUDA lets `torchrun --nproc_per_node N` run as MULTI_CPU (gloo).
    use_cpu = not torch.cuda.is_available()
    num_processes = PartialState(cpu=use_cpu).num_processes
    grad_accum = validate_args(args, num_processes)
    faults = run_utils.parse_fault_injection(args.fault_inject)
    output_dir = Path(args.output_dir)
    logger = run_utils.setup_logging(None, PartialState().is_main_process)
    try:
        model_config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    except ModelLoadError as err:
        sys.exit(f"error: {err}")
    # CPU "auto" times fp32/bf16/fp16 matmuls at this model's shapes (~1 s); rank 0's choice holds on every rank.
    precision_choice = resolve_precision_on_main(
        args.mixed_precision, torch.device("cpu" if use_cpu else "cuda"), model_config, logger
    )
    precision = precision_choice.precision
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
    )
    enable_cpu_fp16(accelerator, precision_choice)  # Accelerate's fp16 is a silent no-op on a CPU
    seed_everything(args.seed)

    # --- everything that can fail on bad input happens before the run folder is touched ---
    try:
        run_utils.check_resume_flags(output_dir, args.resume_from, args.overwrite)
        checkpoint = None
        if args.resume_from:  # look now: "nothing to resume" must not leave a run folder behind
            checkpoint = run_utils.find_resume_checkpoint(output_dir, args.resume_from, logger)
        compute_dtype = precision_choice.dtype
        model, tokenizer = load_model_and_tokenizer(
            args.model,
            quantization=args.quantization,
            # The frozen base is stored in the compute dtype (autocast would cast it on every matmul
            # anyway); the trainable adapters stay fp32, and so do their gradients and AdamW states.
            dtype=compute_dtype,
            device_map={"": accelerator.device} if args.quantization else None,
            trust_remote_code=args.trust_remote_code,
            chat_template=args.chat_template,
            logger=logger,
        )
        # The demo's data keeps its validation file; a user's own --train-file alone is split, because
        # validating (best/, early stopping) on the unrelated underwriting set would say nothing.
        demo_data = Path(args.train_file).resolve() == (REPO / "data/train.jsonl").resolve()
        validation_given = args.validation_file is not None
        if not validation_given and demo_data:
            args.validation_file = str(REPO / "data/validation.jsonl")
        train_records, split = load_records(args.train_file), None
        if args.validation_file is None:
            recorded = read_recorded_split(output_dir / "config.json") if args.resume_from else None
            split_seed = args.seed if args.validation_split_seed is None else args.validation_split_seed
            train_records, val_records, split = hold_out_validation(
                train_records, args.validation_split, split_seed, args.train_file, recorded
            )
        else:
            val_records = load_records(args.validation_file)
        train_records = train_records[: args.subset or None]  # after the split: --subset never moves it
        train_examples, train_stats = tokenize_records(train_records, tokenizer, args.max_seq_len)
        val_examples, val_stats = tokenize_records(val_records, tokenizer, args.max_seq_len)
        validation_name = args.validation_file or f"the validation split held out of {args.train_file}"
        both_given = validation_given and not demo_data  # only then can the user have swapped the two files
        run_utils.check_splits(
            args.train_file, train_examples, validation_name, val_examples, args.max_seq_len, both_given
        )
        longest = max(len(e["input_ids"]) for e in train_examples)
        attn_implementation = choose_attention(args.attn_implementation, accelerator.device, longest)
        model.set_attn_implementation(attn_implementation)
        target_modules = parse_target_modules(args.target_modules)
        model = apply_lora(model, args.rank, args.alpha, args.dropout, target_modules,
                           quantized=bool(args.quantization), gradient_checkpointing=args.gradient_checkpointing)  # fmt: skip
        memory_preflight = run_utils.check_memory(
            model.config, args, accelerator.device, compute_dtype, logger, seq_len=-(-longest // 8) * 8
        )
    except (DataError, ModelLoadError, LoraSetupError, CheckpointError, run_utils.RunFolderError) as err:
        sys.exit(f"error: {err}")
    params = count_parameters(model)
    batches_per_epoch = math.ceil(len(train_examples) / (args.batch_size * num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / grad_accum)
    total_steps = min(args.max_steps or math.inf, steps_per_epoch * args.epochs)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    # The MFU denominator: the FASTEST probed dtype's matmul rate here, not the chosen one's (a slow choice shows).
    peak_flops = precision_choice.peak_flops

    # --- run folder: lock, write test, the resolved configuration before the first step ---
    lock = None
    if accelerator.is_main_process:
        try:
            run_utils.preflight_write(output_dir, reserve_mb=50 + 12 * params["trainable"] / 2**20 * (args.save_total_limit + 2))  # fmt: skip
            lock = run_utils.acquire_lock(output_dir)
        except run_utils.RunFolderError as err:
            sys.exit(f"error: {err}")
        if args.overwrite and not args.resume_from:
            run_utils.clear_run_logs(output_dir)
    accelerator.wait_for_everyone()
    logger = run_utils.setup_logging(output_dir / "train.log", accelerator.is_main_process)
    derived = {
        "grad_accum": grad_accum, "num_processes": num_processes, "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps, "warmup_steps": warmup_steps, "mixed_precision": precision, "base_dtype": str(compute_dtype).removeprefix("torch."),
        "attn_implementation": attn_implementation, "memory_preflight": memory_preflight,
        "device": str(accelerator.device), "distributed_type": str(accelerator.distributed_type),
        "trainable_params": params["trainable"], "total_params": params["total"], "trainable_pct": params["trainable_pct"],
        "train_examples": len(train_examples), "validation_examples": len(val_examples),
        "tokenize_stats": {"train": vars(train_stats), "validation": vars(val_stats)},
        "peak_flops": peak_flops, "peak_flops_dtype": precision_choice.peak_dtype, "precision": precision_choice.to_json(),
    }  # fmt: skip
    run_config = run_utils.build_run_config(args, derived, model, REPO)
    run_config["dataset"]["validation_split"] = split  # None when a --validation-file was used
    config = redact_secrets(run_config, secret_env_values())
    if accelerator.is_main_process:
        write_json(output_dir / "config.json", config)
    logger.info(
        f"trainable params {params['trainable']:,} / {params['total']:,} ({params['trainable_pct']:.3f}%) | "
        f"{len(train_examples)} train / {len(val_examples)} validation examples "
        f"({train_stats.truncated_history} truncated, {train_stats.dropped_overlong} dropped > {args.max_seq_len} tokens)"
    )
    logger.info(
        f"{num_processes} process(es) x batch {args.batch_size} x grad accum {grad_accum} = effective batch "
        f"{args.effective_batch_size} | {steps_per_epoch} steps/epoch, {total_steps} total, {warmup_steps} warmup "
        f"| {precision} on {accelerator.device}"
    )
    logger.info(precision_choice.describe())  # the probe's figures, the choice and the MFU denominator
    if split is not None:
        logger.info(
            f"validation: {split['validation_examples']} of the {split['source_examples']} examples of {args.train_file} "
            f"held out (--validation-split {split['fraction']}, seed {split['seed']}; recorded in config.json); "
            "pass --validation-file to validate on a file of your own"
        )

    # --- optimizer, schedule, data ---
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]  # LoRA A/B matrices
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # biases, norms (if trainable)
    param_groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=tuple(args.adam_betas))
    # Not passed to prepare(): Accelerate would step it once per process; we step it once per update.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    lengths = [len(e["input_ids"]) for e in train_examples]
    train_sampler = LengthGroupedBatchSampler(lengths, args.batch_size, seed=args.seed)

    def collate(batch: list[dict]) -> dict:
        return collate_batch(batch, tokenizer.pad_token_id, pad_to_multiple_of=8)

    def collate_with_index(batch: list[dict]) -> dict:  # the index lets --log-examples audit the sharding
        return collate(batch) | {"index": torch.tensor([e["index"] for e in batch])}

    # Own generator: making a DataLoader iterator then never draws from the global torch RNG, so the
    # dropout masks after a resume are the ones an uninterrupted run would have used.
    generator = torch.Generator().manual_seed(args.seed)
    train_dataloader = DataLoader(
        train_examples, batch_sampler=train_sampler, collate_fn=collate_with_index, generator=generator
    )
    val_sorted = sorted(val_examples, key=lambda e: len(e["input_ids"]))  # similar lengths share a batch
    eval_dataloader = DataLoader(val_sorted, batch_size=args.eval_batch_size, collate_fn=collate)
    loss_model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        TrainedTokenLoss(model), optimizer, train_dataloader, eval_dataloader
    )
    if num_processes > 1:
        KEEP_UNTIL_EXIT.extend([accelerator, loss_model])  # the DDP model must outlive main(): see exit_distributed
    trainable = [p for p in model.parameters() if p.requires_grad]
    matmul_params = count_matmul_params(model)
    sample_records = [val_records[e["index"]] for e in val_examples[: args.num_samples]]

    state = run_utils.new_trainer_state()
    if checkpoint is not None:
        try:
            state = run_utils.load_checkpoint(accelerator, model, optimizer, lr_scheduler, checkpoint)
        except CheckpointError as err:
            sys.exit(f"error: {err}")
        logger.info(f"resumed from {checkpoint}: step {state['global_step']}, epoch {state['epoch'] + 1}, "
                    f"batch {state['batches_done_in_epoch']}")  # fmt: skip
    tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}
    accelerator.init_trackers("tensorboard" if args.report_to == "tensorboard" else args.run_name, tracker_config)

    def log_jsonl(name: str, record: dict) -> None:
        if accelerator.is_main_process:
            run_utils.append_jsonl(output_dir / name, record)

    def evaluate(epoch: float, baseline: bool = False) -> None:
        step = state["global_step"]
        metrics = evaluate_loss(loss_model, eval_dataloader, accelerator, seed=args.seed)
        best = state["best_val_loss"]
        improved = not baseline and (best is None or metrics["val_loss"] < best - args.early_stopping_min_delta)
        record = {"step": step, "epoch": epoch, "baseline": baseline, "is_best": improved, **metrics}
        if accelerator.is_main_process and sample_records:
            # The samples are scored like evaluate.py scores the test split, so a run whose loss falls
            # while it still writes no decision says so in its logs (and the convergence report flags it).
            prompts = [prompt_messages(r["messages"]) for r in sample_records]
            with accelerator.autocast():
                replies = generate_replies(model, tokenizer, prompts, len(prompts), args.max_new_tokens)
            samples = [
                {"id": r.get("id"), "prompt_messages": p, "reference": r["messages"][len(p)]["content"], "generated": g}
                for r, p, g in zip(sample_records, prompts, replies, strict=True)
            ]
            (output_dir / "samples").mkdir(exist_ok=True)
            (output_dir / "samples" / f"step_{step:06d}.jsonl").write_text(
                "".join(json.dumps(s) + "\n" for s in samples)
            )
            record |= score_samples(replies, [r.get("decision") for r in sample_records])
        log_jsonl("eval_log.jsonl", record)
        accelerator.log(
            {f"eval/{k}": v for k, v in record.items() if isinstance(v, int | float) and k != "step"}, step=step
        )
        decided = (
            f" | samples: {record['sample_parse_rate']:.0%} decide, {record['sample_outcome_accuracy']:.0%} right"
            if record.get("sample_parse_rate") is not None
            else ""
        )
        logger.info(
            f"eval step {step} | val loss {metrics['val_loss']:.4f} ± {metrics['val_loss_ci95']:.4f} | "
            f"ppl {metrics['val_ppl']:.3f} | {metrics['eval_time_s']:.1f}s{decided}"
            + (" | baseline" if baseline else " | new best" if improved else "")
        )
        if baseline:
            state["baseline_val_ppl"] = metrics["val_ppl"]
        elif improved:
            state.update(best_val_loss=metrics["val_loss"], best_step=step, best_epoch=math.ceil(epoch))
            state["evals_without_improvement"] = 0
            if accelerator.is_main_process:
                extra = {"metrics.json": record, "trainer_state.json": state, "config.json": config}
                run_utils.save_adapter_folder(model, tokenizer, output_dir / "best", args.model, extra)
        else:
            state["evals_without_improvement"] += 1

    def save_checkpoint() -> None:
        folder = output_dir / "checkpoints" / f"step_{state['global_step']:06d}"
        run_utils.save_checkpoint(accelerator, model, optimizer, lr_scheduler, state, folder, config)
        if accelerator.is_main_process:
            run_utils.rotate_checkpoints(output_dir / "checkpoints", args.save_total_limit)

    if not args.resume_from and not args.no_baseline:
        evaluate(0.0, baseline=True)

    # --- the training loop: global_step counts optimizer updates, micro_step counts batches ---
    status, stop_reason = "completed", ""
    progress = tqdm(total=total_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process)
    loss_model.train()
    clock = time.perf_counter() - state["train_time_s"]
    window = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss, trained, tokens, sum len^2, -
    for epoch in range(state["epoch"], args.epochs):
        epoch_start = time.perf_counter()
        skip = state["batches_done_in_epoch"]  # > 0 only when resuming mid-epoch
        if not skip:  # a new epoch; a mid-epoch resume keeps the sums of the steps before its checkpoint
            state.update(epoch_loss_sum=0.0, epoch_loss_steps=0)
        epoch_dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        # Both calls matter: iter() re-applies Accelerate's own epoch counter to the sampler (a fresh
        # skip-dataloader would restart it at 0), and a multi-process shard does not forward set_epoch.
        epoch_dataloader.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        step_start = time.perf_counter()
        for batch in epoch_dataloader:
            example_index = batch.pop("index")
            if args.log_examples:
                record = {"micro_step": state["micro_step"] + 1, "epoch": epoch, "index": example_index.tolist()}
                run_utils.append_jsonl(output_dir / f"examples_rank{accelerator.process_index}.jsonl", record)
            with accelerator.accumulate(loss_model):
                row_losses, row_counts = loss_model(**batch)
                loss_sum, n_trained = row_losses.sum(), row_counts.sum()
                if state["global_step"] + 1 in faults["loss"]:
                    loss_sum = loss_sum * float("nan")
                # Backward the summed token loss (scaled by a constant that keeps fp16 in range). At the
                # update the gradients are rescaled by the trained-token count of the whole effective
                # batch (all micro-batches, all ranks): the mean over tokens, not a mean of batch means.
                accelerator.backward(loss_sum / (args.max_seq_len * args.batch_size))
                lengths = batch["attention_mask"].sum(1).double()
                window += torch.stack([loss_sum.detach().double(), n_trained.double(), lengths.sum(), (lengths**2).sum(), lengths.new_zeros(())])  # fmt: skip
                state["micro_step"] += 1
                state["batches_done_in_epoch"] += 1
                if state["micro_step"] in faults["stop"]:
                    raise SystemExit(f"error: --fault-inject stopped the run after micro-step {state['micro_step']}")
                if not accelerator.sync_gradients:
                    continue
                # One host sync per update: totals over all ranks, then the per-token rescale.
                loss_total, trained, tokens, sum_sq, _ = accelerator.reduce(window, "sum").tolist()
                window.zero_()
                rescale = args.max_seq_len * args.batch_size * grad_accum * num_processes / max(trained, 1.0)
                torch._foreach_mul_([p.grad for p in trainable if p.grad is not None], rescale)
                if state["global_step"] + 1 in faults["grad"]:
                    trainable[0].grad.fill_(float("inf"))
                grad_norm = float(accelerator.clip_grad_norm_(trainable, args.max_grad_norm))
                layer_norms = (
                    lora_grad_norms(model) if (state["global_step"] + 1) % max(args.grad_log_every, 1) == 0 else {}
                )
                loss = loss_total / max(trained, 1.0)
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite or accelerator.scaler is not None:
                    optimizer.step()  # under fp16 the GradScaler skips an inf/NaN update by itself
                stepped = finite and not optimizer.step_was_skipped
                if stepped:
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["global_step"] += 1
                progress.update(1)
                if not finite:  # NaN guard: the update was skipped; too many in a row stop the run
                    state["consecutive_bad_steps"] += 1
                    state["bad_steps_total"] += 1
                    reason = f"non-finite loss {loss} or grad norm {grad_norm}: update skipped"
                    log_jsonl("train_log.jsonl", {"type": "bad_step", "step": state["global_step"], "reason": reason})
                    logger.warning(
                        f"step {state['global_step']} | {reason} ({state['consecutive_bad_steps']} in a row)"
                    )
                    if state["consecutive_bad_steps"] > args.max_bad_steps:
                        status = "stopped_bad_steps"
                        stop_reason = f"{state['consecutive_bad_steps']} non-finite steps in a row (> --max-bad-steps {args.max_bad_steps}); lower --lr or check the data"  # fmt: skip
                        break
                else:
                    state["consecutive_bad_steps"] = 0
                    state["epoch_loss_sum"] += loss
                    state["epoch_loss_steps"] += 1
                seconds, step_start = time.perf_counter() - step_start, time.perf_counter()
                record = {
                    "type": "step", "step": state["global_step"], "epoch": epoch + state["batches_done_in_epoch"] / len(train_dataloader),
                    "loss": loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm, "skipped": not stepped,
                    "tokens": int(tokens), "trained_tokens": int(trained), "tokens_per_s": tokens / seconds,
                    "mfu": estimate_train_flops(matmul_params, tokens, trained, sum_sq) / seconds / peak_flops,
                    "peak_mem_mb": run_utils.peak_memory_mb(accelerator.device),
                    "gpu_util": run_utils.gpu_utilization(accelerator.device), "elapsed_s": time.perf_counter() - clock,
                }  # fmt: skip
                state["train_time_s"] = record["elapsed_s"]
                log_jsonl("train_log.jsonl", record)
                if layer_norms:
                    log_jsonl("grad_log.jsonl", {"step": state["global_step"], "norms": layer_norms})
                accelerator.log({f"train/{k}": v for k, v in record.items() if isinstance(v, int | float)}, step=record["step"])  # fmt: skip
                if state["global_step"] % args.log_every == 0:
                    logger.info(
                        f"step {record['step']} | loss {loss:.4f} | lr {record['lr']:.2e} | grad {grad_norm:.3f} | "
                        f"{record['tokens_per_s']:.0f} tok/s | mfu {record['mfu']:.1%} | {record['peak_mem_mb']:.0f} MiB"
                    )
                if args.eval_every and state["global_step"] % args.eval_every == 0:
                    evaluate(record["epoch"])
                if args.save_every and state["global_step"] % args.save_every == 0:
                    save_checkpoint()
                if state["global_step"] >= total_steps and state["batches_done_in_epoch"] < len(train_dataloader):
                    status, stop_reason = "max_steps", f"reached --max-steps {args.max_steps}"
                    break
        if status == "stopped_bad_steps":
            break
        # --- end of the epoch (or of --max-steps): evaluate, checkpoint, maybe stop early ---
        if status != "max_steps":
            state.update(epoch=epoch + 1, batches_done_in_epoch=0)
            mean_loss = state["epoch_loss_sum"] / max(state["epoch_loss_steps"], 1)
            seconds = time.perf_counter() - epoch_start
            log_jsonl("train_log.jsonl", {"type": "epoch", "epoch": epoch + 1, "step": state["global_step"],
                                          "mean_train_loss": mean_loss, "epoch_time_s": seconds})  # fmt: skip
            logger.info(f"epoch {epoch + 1} | mean train loss {mean_loss:.4f} | {seconds:.1f}s")
        evaluate(
            epoch + state["batches_done_in_epoch"] / len(train_dataloader) if status == "max_steps" else epoch + 1.0
        )
        save_checkpoint()
        patience = args.early_stopping_patience
        if status == "completed" and patience and state["evals_without_improvement"] >= patience:
            status = "early_stopped"
            stop_reason = f"validation loss did not improve by more than {args.early_stopping_min_delta} for {patience} evaluations (best: step {state['best_step']})"  # fmt: skip
            logger.info(f"early stopping: {stop_reason}")
        if status != "completed" or state["global_step"] >= total_steps:
            break
    progress.close()

    # --- final adapter and summary ---
    in_sync = run_utils.check_ranks_in_sync(trainable, accelerator)
    if num_processes > 1:
        logger.info(f"adapter weights identical on all {num_processes} ranks: {in_sync}")
    if accelerator.is_main_process and status != "stopped_bad_steps":
        run_utils.save_adapter_folder(model, tokenizer, output_dir / "final", args.model, {"trainer_state.json": state, "config.json": config})  # fmt: skip
        write_json(output_dir / "update_ratios.json", lora_update_ratios(model))
    summary = run_utils.write_summary(output_dir, status, stop_reason, state, params, accelerator, in_sync)
    logger.info(
        f"done: {status}{f' ({stop_reason})' if stop_reason else ''} | best val ppl {summary['best_val_ppl']} "
        f"at step {summary['best_step']} (baseline {summary['baseline_val_ppl']}) | {summary['train_time_s']:.0f}s"
    )
    accelerator.end_training()
    run_utils.release_lock(lock)
    if status == "stopped_bad_steps":
        sys.exit(f"error: training stopped: {stop_reason}")
    return summary


def exit_distributed(code: int | str | None) -> None:
    """End a torchrun rank without freeing the DDP model or tearing the interpreter down.

    Freeing the DDP reducer destroys the gloo process group, whose destructor joins the gloo worker
    threads while holding the GIL; a worker whose last job was an all-gather needs the GIL to free
    that job's tensors: deadlock (py-spy, torch 2.13: ~1 in 4 two-process runs hung after "done",
    and the CI run that never finished). So main() keeps the prepared model alive in KEEP_UNTIL_EXIT
    and the rank leaves with os._exit; logs, checkpoints and trackers are closed by then.

    Args:
        code: the exit status, or a message for stderr (exit status 1), as `sys.exit` takes it.
    """
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
            exit_code = 0
        except SystemExit as stop:
            exit_code = stop.code
        except BaseException:
            traceback.print_exc()
            exit_code = 1
        exit_distributed(exit_code)
