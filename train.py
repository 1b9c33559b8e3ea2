"""LoRA / QLoRA finetuning of a chat model, with validation, checkpoints, resume and early stopping.

    python train.py                                       # defaults: embedded SmolLM2-135M, data/train.jsonl
    accelerate launch train.py --lr 2e-4 --rank 16        # same, through Accelerate (accelerate_config.yaml)
    python train.py --quantization nf4                    # QLoRA: 4-bit NF4 base + double quantization
    python train.py --resume-from latest --output-dir runs/demo    # continue exactly where it stopped
    python train.py --config runs/demo/config.json --output-dir runs/again   # reproduce a run
    torchrun --nproc_per_node 2 train.py --max-steps 20   # 2-process data parallel on CPU (gloo)

What it does, in order: validate flags; load and tokenize data (assistant-only labels) before
anything is written; create the run folder (lock, pre-flight write test, config.json); load the
base (optionally 4-bit), inject LoRA on q/k/v; evaluate the untouched base (step 0 baseline); then
train with AdamW + cosine warmup + clipping + mixed precision + gradient accumulation; evaluate
each epoch (loss, perplexity, sample generations); keep best/ by validation perplexity; stop early
when validation stops improving; write checkpoints that resume exactly, and final/.
The folder layout is documented in docs/run_folder.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from common import run as run_utils
from common.data import DataError, LengthGroupedBatchSampler, collate_batch, load_records, tokenize_records
from common.lora import (
    LoraSetupError,
    apply_lora,
    count_parameters,
    lora_grad_norms,
    lora_update_ratios,
    parse_target_modules,
)
from common.model import DEFAULT_MODEL, ModelLoadError, load_model_and_tokenizer
from common.seed import seed_everything
from common.training import (
    CheckpointError,
    TrainedTokenLoss,
    count_matmul_params,
    estimate_train_flops,
    evaluate_loss,
    measure_peak_flops,
    write_json,
)

REPO = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; `--config FILE` (YAML, or a run's config.json) sets defaults first."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML/JSON file of flag defaults (a run's config.json works)")
    # --- data and model ---
    parser.add_argument("--model", default=DEFAULT_MODEL, help="alias, local folder or hub id of the base chat model")
    parser.add_argument(
        "--train-file", default=str(REPO / "data/train.jsonl"), help="training data (jsonl/json/csv/parquet)"
    )
    parser.add_argument("--validation-file", default=str(REPO / "data/validation.jsonl"), help="validation data")
    parser.add_argument("--subset", type=int, default=0, help="use only the first N training examples (0 = all)")
    parser.add_argument(
        "--max-seq-len", type=int, default=1024, help="longest example in tokens; longer ones lose old turns"
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    # --- output ---
    parser.add_argument("--run-name", default=None, help="run name (default: a timestamp)")
    parser.add_argument("--output-dir", default=None, help="run folder (default: runs/<run-name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing finished run folder")
    parser.add_argument("--resume-from", default=None, help="'latest' or a checkpoint folder to continue from")
    # --- lora ---
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r (8-16 is the usual range)")
    parser.add_argument("--alpha", type=float, default=32, help="LoRA alpha; the update is scaled by alpha/rank")
    parser.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    parser.add_argument(
        "--target-modules", default="q_proj,k_proj,v_proj", help="comma-separated module names or all-linear"
    )
    parser.add_argument(
        "--quantization", choices=["nf4"], default=None, help="nf4: QLoRA on a 4-bit base (bitsandbytes)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute activations (default: on for QLoRA)",
    )
    # --- optimization ---
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per device per micro-batch")
    parser.add_argument(
        "--effective-batch-size", type=int, default=None, help="examples per optimizer step, all devices (default 16)"
    )
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (else derived)")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the training data")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0 = no limit)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of steps with linear warmup")
    parser.add_argument(
        "--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay (LoRA matrices only)"
    )
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm")
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "fp16", "bf16"],
        default="auto",
        help="auto: bf16 where supported, fp16 on older GPUs",
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed for init, data order and dropout")
    parser.add_argument(
        "--max-bad-steps", type=int, default=3, help="stop after this many consecutive non-finite steps"
    )
    # --- evaluation, checkpoints, early stopping ---
    parser.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0 = epoch ends only)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="validation micro-batch size")
    parser.add_argument("--no-baseline", action="store_true", help="skip the step-0 evaluation of the untouched base")
    parser.add_argument("--num-samples", type=int, default=5, help="sample generations per evaluation")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens per sample generation")
    parser.add_argument(
        "--early-stopping-patience",
        type=int,
        default=2,
        help="evaluations without improvement before stopping (0 = off)",
    )
    parser.add_argument(
        "--early-stopping-min-delta",
        type=float,
        default=0.0,
        help="validation loss decrease that counts as improvement",
    )
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (epoch ends always)")
    parser.add_argument(
        "--save-total-limit", type=int, default=3, help="checkpoints kept (best/ and the newest are never deleted)"
    )
    # --- logging ---
    parser.add_argument("--log-every", type=int, default=1, help="log a line every N optimizer steps")
    parser.add_argument("--grad-log-every", type=int, default=5, help="log per-layer LoRA gradient norms every N steps")
    parser.add_argument(
        "--report-to", choices=["tensorboard", "wandb", "none"], default="tensorboard", help="experiment tracker"
    )
    parser.add_argument(
        "--strict-memory", action="store_true", help="refuse to start when the memory estimate does not fit"
    )
    parser.add_argument("--fault-inject", default="", help="testing only: 'loss:3,grad:5' makes those steps non-finite")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**load_config_defaults(pre.config, parser))
    return parser.parse_args(argv)


def load_config_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read flag defaults from YAML/JSON; a run's config.json contributes its "args" section."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        sys.exit(f"error: --config {path}: cannot read ({err})")
    data = data.get("args", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        sys.exit(f"error: --config {path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in known:
            sys.exit(f"error: --config {path}: unknown key '{key}'; see `python train.py --help`")
        if dest not in ("config", "resume_from", "output_dir", "run_name", "overwrite"):
            defaults[dest] = value
    return defaults


def validate_args(args: argparse.Namespace, num_processes: int) -> int:
    """Check flags right after parsing; return the gradient accumulation steps.

    Raises:
        SystemExit: with a message naming the flag and what to do.
    """
    checks = [
        (args.rank >= 1, f"--rank must be >= 1, got {args.rank}"),
        (args.alpha > 0, f"--alpha must be > 0, got {args.alpha}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.max_seq_len >= 16, f"--max-seq-len must be >= 16, got {args.max_seq_len}"),
        (0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {args.max_grad_norm}"),
        (args.max_steps >= 0 and args.subset >= 0, "--max-steps and --subset must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            sys.exit(f"error: {message}")
    per_step = args.batch_size * num_processes
    if args.grad_accum is not None:
        if args.grad_accum < 1:
            sys.exit(f"error: --grad-accum must be >= 1, got {args.grad_accum}")
        if args.effective_batch_size not in (None, per_step * args.grad_accum):
            sys.exit(
                f"error: --grad-accum {args.grad_accum} x --batch-size {args.batch_size} x {num_processes} processes "
                f"= {per_step * args.grad_accum}, but --effective-batch-size is {args.effective_batch_size}; give one of them"
            )
        args.effective_batch_size = per_step * args.grad_accum
        return args.grad_accum
    args.effective_batch_size = args.effective_batch_size or 16
    if args.effective_batch_size % per_step:
        sys.exit(
            f"error: --effective-batch-size {args.effective_batch_size} is not divisible by --batch-size "
            f"{args.batch_size} x {num_processes} processes; change one of them"
        )
    return args.effective_batch_size // per_step


def resolve_mixed_precision(requested: str, logger) -> str:
    """auto: bf16 on CPUs and GPUs that support it, fp16 on older GPUs (T4), else no."""
    if torch.cuda.is_available():
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not bf16_ok:
            logger.warning("bf16 is not supported on this GPU; falling back to fp16 (with loss scaling)")
            return "fp16"
        if requested == "auto":
            launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
            return launcher if launcher in ("fp16", "bf16") else ("bf16" if bf16_ok else "fp16")
        return requested
    if requested == "fp16":
        logger.warning("fp16 autocast is not useful on CPU; using bf16 instead")
        requested = "bf16"
    if requested in ("auto", "bf16"):
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    return requested


def parse_fault_injection(spec: str) -> dict[str, set[int]]:
    """'loss:3,grad:5' -> {"loss": {3}, "grad": {5}} (optimizer steps, 1-based)."""
    faults = {"loss": set(), "grad": set()}
    for item in filter(None, spec.split(",")):
        kind, _, step = item.partition(":")
        if kind not in faults or not step.isdigit():
            sys.exit(f"error: --fault-inject item '{item}' must look like loss:3 or grad:5")
        faults[kind].add(int(step))
    return faults


@torch.no_grad()
def generate_samples(model, tokenizer, records: list[dict], max_new_tokens: int, accelerator) -> list[dict]:
    """Greedy replies to the prompt (all turns before the final assistant turn) of each record."""
    if not records:
        return []
    prompts = [
        r["messages"][: max(i for i, m in enumerate(r["messages"]) if m["role"] == "assistant")] for r in records
    ]
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"  # generation appends on the right, so pad on the left
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(accelerator.device)
    tokenizer.padding_side = "right"
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    model.train(was_training)
    replies = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        {
            "id": r.get("id", r["_line"]),
            "prompt_messages": p,
            "reference": r["messages"][len(p)]["content"],
            "generated": g.strip(),
        }
        for r, p, g in zip(records, prompts, replies, strict=True)
    ]


def main(argv: list[str] | None = None) -> dict:
    """Train; return the run summary (also written to summary.json)."""
    args = parse_args(argv)
    from accelerate import PartialState

    num_processes = PartialState().num_processes
    grad_accum = validate_args(args, num_processes)
    faults = parse_fault_injection(args.fault_inject)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.quantization == "nf4"
    args.run_name = args.run_name or time.strftime("%Y%m%d-%H%M%S")
    output_dir = Path(args.output_dir or REPO / "runs" / args.run_name)
    args.output_dir = str(output_dir)
    logger = run_utils.setup_logging(None, PartialState().is_main_process)
    mixed_precision = resolve_mixed_precision(args.mixed_precision, logger)
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
    )
    seed_everything(args.seed)

    # --- everything that can fail on bad input happens before the run folder is touched ---
    try:
        model, tokenizer = load_model_and_tokenizer(
            args.model,
            quantization=args.quantization,
            dtype=torch.bfloat16
            if args.quantization and mixed_precision == "bf16"
            else (torch.float16 if args.quantization else torch.float32),
            device_map={"": accelerator.device} if args.quantization else None,
            trust_remote_code=args.trust_remote_code,
        )
        train_records = load_records(args.train_file)[: args.subset or None]
        val_records = load_records(args.validation_file)
        train_examples, train_stats = tokenize_records(train_records, tokenizer, args.max_seq_len)
        val_examples, val_stats = tokenize_records(val_records, tokenizer, args.max_seq_len)
        if not train_examples:
            raise DataError(
                f"{args.train_file}: no example left after dropping {train_stats.dropped_overlong} longer than --max-seq-len {args.max_seq_len}"
            )
        if not val_examples:
            raise DataError(f"{args.validation_file}: no example left after dropping those longer than --max-seq-len")
        if len(val_examples) > len(train_examples):
            raise DataError(
                f"{args.validation_file} has more examples ({len(val_examples)}) than {args.train_file} ({len(train_examples)}); swap the files or use a smaller validation split"
            )
        model = apply_lora(
            model,
            args.rank,
            args.alpha,
            args.dropout,
            parse_target_modules(args.target_modules),
            quantized=bool(args.quantization),
            gradient_checkpointing=args.gradient_checkpointing,
        )
    except (DataError, ModelLoadError, LoraSetupError) as err:
        sys.exit(f"error: {err}")
    params = count_parameters(model)
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / (args.batch_size * num_processes)) / grad_accum)
    total_steps = (
        steps_per_epoch * args.epochs if not args.max_steps else min(args.max_steps, steps_per_epoch * args.epochs)
    )
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)

    # --- run folder: refuse to clobber, lock, pre-flight write test, resolved config ---
    resuming = args.resume_from is not None
    if (output_dir / "config.json").exists() and not resuming:
        if not args.overwrite:
            sys.exit(
                f"error: {output_dir} already holds a run; pass --resume-from latest to continue it, --overwrite to replace it, or another --output-dir"
            )
    lock = None
    try:
        if accelerator.is_main_process:
            run_utils.preflight_write(
                output_dir, reserve_mb=20 + 3 * 4 * params["trainable"] / 2**20 * (args.save_total_limit + 2)
            )
            lock = run_utils.acquire_lock(output_dir)
            if args.overwrite and not resuming:
                for name in ("train_log.jsonl", "eval_log.jsonl", "grad_log.jsonl", "summary.json", "train.log"):
                    (output_dir / name).unlink(missing_ok=True)
    except run_utils.RunFolderError as err:
        sys.exit(f"error: {err}")
    accelerator.wait_for_everyone()
    logger = run_utils.setup_logging(output_dir / "train.log", accelerator.is_main_process)
    config = {
        "args": vars(args) | {"adam_betas": list(args.adam_betas)},
        "derived": {
            "grad_accum": grad_accum,
            "num_processes": num_processes,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "mixed_precision": mixed_precision,
            "device": str(accelerator.device),
            "distributed_type": str(accelerator.distributed_type),
            "trainable_params": params["trainable"],
            "total_params": params["total"],
            "trainable_pct": params["trainable_pct"],
            "train_examples": len(train_examples),
            "validation_examples": len(val_examples),
            "tokenize_stats": {"train": vars(train_stats), "validation": vars(val_stats)},
        },
        "lora": json.loads(json.dumps(model.peft_config["default"].to_dict(), default=str)),
        "versions": run_utils.package_versions(),
        "git_commit": run_utils.git_commit(REPO),
        "dataset": {
            "train_file": args.train_file,
            "train_sha256": run_utils.sha256_file(args.train_file),
            "validation_file": args.validation_file,
            "validation_sha256": run_utils.sha256_file(args.validation_file),
        },
        "seed": args.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    config = run_utils.redact_secrets(config)
    if accelerator.is_main_process:
        write_json(output_dir / "config.json", config)
    logger.info(
        f"trainable params {params['trainable']:,} / {params['total']:,} ({params['trainable_pct']:.3f}%) | "
        f"{len(train_examples)} train / {len(val_examples)} validation examples | {train_stats.truncated_history} truncated, "
        f"{train_stats.dropped_overlong} dropped (> {args.max_seq_len} tokens)"
    )
    logger.info(
        f"{num_processes} process(es) x batch {args.batch_size} x grad accum {grad_accum} = effective batch "
        f"{args.batch_size * num_processes * grad_accum} | {steps_per_epoch} steps/epoch, {total_steps} total, "
        f"{warmup_steps} warmup | precision {mixed_precision} | {accelerator.device}"
    )

    # --- optimizer, schedule, data ---
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=tuple(args.adam_betas),
    )
    # Not passed to prepare(): Accelerate would step it once per process; we step it once per update.
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    train_sampler = LengthGroupedBatchSampler(
        [len(e["input_ids"]) for e in train_examples], args.batch_size, seed=args.seed
    )
    collate = lambda batch: collate_batch(batch, tokenizer.pad_token_id)  # noqa: E731
    # Own generator: creating a DataLoader iterator then never consumes the global torch RNG, so
    # dropout masks after a resume are the same as in an uninterrupted run.
    train_dataloader = DataLoader(
        train_examples,
        batch_sampler=train_sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    val_order = sorted(range(len(val_examples)), key=lambda i: len(val_examples[i]["input_ids"]))
    eval_dataloader = DataLoader(
        [val_examples[i] for i in val_order], batch_size=args.eval_batch_size, collate_fn=collate
    )
    loss_model = TrainedTokenLoss(model)
    loss_model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        loss_model, optimizer, train_dataloader, eval_dataloader
    )
    model = accelerator.unwrap_model(loss_model).model  # the PEFT model, for saving/eval/generation
    trainable = [p for p in model.parameters() if p.requires_grad]
    matmul_params = count_matmul_params(model)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    peak_flops = measure_peak_flops(accelerator.device, compute_dtype)
    sample_records = [val_records[e["index"]] for e in val_examples[: args.num_samples]]

    state = {
        "global_step": 0,
        "micro_step": 0,
        "epoch": 0,
        "batches_done_in_epoch": 0,
        "best_val_loss": None,
        "best_step": None,
        "best_epoch": None,
        "evals_without_improvement": 0,
        "consecutive_bad_steps": 0,
        "bad_steps_total": 0,
        "train_time_s": 0.0,
        "baseline_val_ppl": None,
    }
    if resuming:
        try:
            checkpoint = run_utils.find_resume_checkpoint(output_dir, args.resume_from, logger)
            state = run_utils.load_checkpoint(accelerator, model, optimizer, lr_scheduler, checkpoint)
        except CheckpointError as err:
            sys.exit(f"error: {err}")
        logger.info(
            f"resumed from {checkpoint} at step {state['global_step']} (epoch {state['epoch'] + 1}, batch {state['batches_done_in_epoch']})"
        )
    if accelerator.is_main_process:
        (output_dir / "samples").mkdir(exist_ok=True)
    accelerator.init_trackers(
        "tensorboard" if args.report_to == "tensorboard" else args.run_name,
        config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
    )

    def log_jsonl(name: str, record: dict) -> None:
        if accelerator.is_main_process:
            run_utils.append_jsonl(output_dir / name, record)

    def run_evaluation(step: int, epoch: float, baseline: bool = False) -> dict:
        metrics = evaluate_loss(model, eval_dataloader, accelerator, seed=args.seed)
        samples = (
            generate_samples(model, tokenizer, sample_records, args.max_new_tokens, accelerator)
            if accelerator.is_main_process
            else []
        )
        improved = not baseline and (
            state["best_val_loss"] is None
            or metrics["val_loss"] < state["best_val_loss"] - args.early_stopping_min_delta
        )
        record = {"step": step, "epoch": epoch, "baseline": baseline, "is_best": improved, **metrics}
        log_jsonl("eval_log.jsonl", record)
        if accelerator.is_main_process:
            with open(output_dir / "samples" / f"step_{step:06d}.jsonl", "w") as handle:
                handle.writelines(json.dumps(s) + "\n" for s in samples)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        logger.info(
            f"eval step {step} | val loss {metrics['val_loss']:.4f} ± {metrics['val_loss_ci95']:.4f} | ppl {metrics['val_ppl']:.3f} | {metrics['eval_time_s']:.1f}s{' | baseline' if baseline else ' | best' if improved else ''}"
        )
        if baseline:
            state["baseline_val_ppl"] = metrics["val_ppl"]
        elif improved:
            state.update(
                best_val_loss=metrics["val_loss"],
                best_step=step,
                best_epoch=math.ceil(epoch),
                evals_without_improvement=0,
            )
            if accelerator.is_main_process:
                run_utils.save_adapter_folder(
                    model,
                    tokenizer,
                    output_dir / "best",
                    args.model,
                    {"metrics.json": record, "trainer_state.json": state, "config.json": config},
                )
        else:
            state["evals_without_improvement"] += 1
        return record

    def save_checkpoint() -> None:
        folder = output_dir / "checkpoints" / f"step_{state['global_step']:06d}"
        run_utils.save_checkpoint(accelerator, model, optimizer, lr_scheduler, state, folder, config)
        if accelerator.is_main_process:
            run_utils.rotate_checkpoints(output_dir / "checkpoints", args.save_total_limit, protect=set())

    if not resuming and not args.no_baseline:
        run_evaluation(0, 0.0, baseline=True)

    # --- the training loop ---
    status, stop_reason = "completed", ""
    progress = tqdm(
        total=total_steps, initial=state["global_step"], disable=not accelerator.is_local_main_process, desc="train"
    )
    loss_model.train()
    start_time = time.perf_counter() - state["train_time_s"]
    for epoch in range(state["epoch"], args.epochs):
        train_sampler.set_epoch(epoch)
        epoch_start, epoch_losses = time.perf_counter(), []
        skip = state["batches_done_in_epoch"]
        dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        window_loss = torch.zeros((), device=accelerator.device)
        window_counts = torch.zeros(4, device=accelerator.device)  # trained tokens, tokens, sum len^2, tokens/padded
        step_start = time.perf_counter()
        for batch in dataloader:
            with accelerator.accumulate(loss_model):
                loss_sum, n_trained = loss_model(**batch)
                if state["global_step"] + 1 in faults["loss"]:
                    loss_sum = loss_sum * float("nan")
                # Backward the summed loss; at the optimizer step the gradients are rescaled by the
                # trained-token count of the whole effective batch (all micro-batches, all ranks),
                # so the update is the mean over trained tokens, not a mean of micro-batch means.
                accelerator.backward(loss_sum / (args.max_seq_len * args.batch_size))
                lengths = batch["attention_mask"].sum(1).float()
                window_loss += loss_sum.detach()
                window_counts += torch.stack(
                    [n_trained.float(), lengths.sum(), (lengths**2).sum(), torch.zeros((), device=lengths.device)]
                )
                state["micro_step"] += 1
                state["batches_done_in_epoch"] += 1
                if accelerator.sync_gradients:
                    totals = accelerator.reduce(torch.cat([window_loss.reshape(1), window_counts]), "sum")
                    loss_total, trained_total, tokens_total, sum_sq = totals[0], totals[1], totals[2], totals[3]
                    scale = (
                        (args.max_seq_len * args.batch_size) * grad_accum * num_processes / trained_total.clamp_min(1.0)
                    )
                    for param in trainable:
                        if param.grad is not None:
                            param.grad.mul_(scale)
                    if state["global_step"] + 1 in faults["grad"]:
                        trainable[0].grad.fill_(float("inf"))
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    do_grad_log = args.grad_log_every and (state["global_step"] + 1) % args.grad_log_every == 0
                    layer_norms = lora_grad_norms(model) if do_grad_log else {}
                    loss_value, grad_value = (loss_total / trained_total.clamp_min(1.0)).item(), float(grad_norm)
                    finite = math.isfinite(loss_value) and math.isfinite(grad_value)
                    if finite or accelerator.scaler is not None:
                        optimizer.step()  # with fp16 the GradScaler skips inf/NaN updates itself
                    stepped = finite and not optimizer.step_was_skipped
                    if stepped:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    window_loss.zero_()
                    window_counts.zero_()
                    state["global_step"] += 1
                    progress.update(1)
                    if not finite:
                        state["consecutive_bad_steps"] += 1
                        state["bad_steps_total"] += 1
                        log_jsonl(
                            "train_log.jsonl",
                            {
                                "type": "bad_step",
                                "step": state["global_step"],
                                "reason": f"loss {loss_value}, grad norm {grad_value}",
                            },
                        )
                        logger.warning(
                            f"step {state['global_step']} | non-finite loss {loss_value} or grad norm {grad_value}: update skipped ({state['consecutive_bad_steps']} in a row)"
                        )
                        if state["consecutive_bad_steps"] > args.max_bad_steps:
                            status, stop_reason = (
                                "stopped_bad_steps",
                                f"{state['consecutive_bad_steps']} consecutive non-finite steps (> --max-bad-steps {args.max_bad_steps}); lower --lr or check the data",
                            )
                            break
                    else:
                        state["consecutive_bad_steps"] = 0
                        epoch_losses.append(loss_value)
                    elapsed = time.perf_counter() - step_start
                    step_start = time.perf_counter()
                    tokens, trained = float(tokens_total), float(trained_total)
                    flops = estimate_train_flops(matmul_params, tokens, trained, float(sum_sq))
                    record = {
                        "type": "step",
                        "step": state["global_step"],
                        "epoch": epoch + state["batches_done_in_epoch"] / len(train_dataloader),
                        "loss": loss_value,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "grad_norm": grad_value,
                        "tokens": int(tokens),
                        "trained_tokens": int(trained),
                        "tokens_per_s": tokens / elapsed,
                        "mfu": flops / elapsed / peak_flops,
                        "peak_mem_mb": run_utils.peak_memory_mb(accelerator.device),
                        "gpu_util": run_utils.gpu_utilization(accelerator.device),
                        "elapsed_s": time.perf_counter() - start_time,
                        "skipped": not stepped,
                    }
                    state["train_time_s"] = record["elapsed_s"]
                    log_jsonl("train_log.jsonl", record)
                    if layer_norms:
                        log_jsonl("grad_log.jsonl", {"step": state["global_step"], "norms": layer_norms})
                    accelerator.log(
                        {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and v is not None},
                        step=state["global_step"],
                    )
                    if state["global_step"] % args.log_every == 0:
                        logger.info(
                            f"step {record['step']} | loss {loss_value:.4f} | lr {record['lr']:.2e} | grad {grad_value:.3f} | {record['tokens_per_s']:.0f} tok/s | mfu {record['mfu']:.1%} | mem {record['peak_mem_mb']:.0f} MiB"
                        )
                    if args.eval_every and state["global_step"] % args.eval_every == 0:
                        run_evaluation(state["global_step"], record["epoch"])
                    if args.save_every and state["global_step"] % args.save_every == 0:
                        save_checkpoint()
                    if args.max_steps and state["global_step"] >= args.max_steps:
                        status, stop_reason = "max_steps", f"reached --max-steps {args.max_steps}"
                        break
        if status == "stopped_bad_steps":
            break
        # --- end of epoch (or of --max-steps): evaluate, checkpoint, maybe stop early ---
        epoch_done = status != "max_steps"
        if epoch_done:
            state.update(epoch=epoch + 1, batches_done_in_epoch=0)
            mean_loss = sum(epoch_losses) / max(len(epoch_losses), 1)
            log_jsonl(
                "train_log.jsonl",
                {
                    "type": "epoch",
                    "epoch": epoch + 1,
                    "step": state["global_step"],
                    "mean_train_loss": mean_loss,
                    "epoch_time_s": time.perf_counter() - epoch_start,
                },
            )
            logger.info(
                f"epoch {epoch + 1} | mean train loss {mean_loss:.4f} | {time.perf_counter() - epoch_start:.1f}s"
            )
        run_evaluation(
            state["global_step"],
            epoch + (1.0 if epoch_done else state["batches_done_in_epoch"] / len(train_dataloader)),
        )
        save_checkpoint()
        if status == "max_steps":
            break
        if args.early_stopping_patience and state["evals_without_improvement"] >= args.early_stopping_patience:
            status, stop_reason = (
                "early_stopped",
                f"validation loss did not improve by more than {args.early_stopping_min_delta} for {args.early_stopping_patience} evaluations (best at step {state['best_step']})",
            )
            logger.info(f"early stopping: {stop_reason}")
            break
    progress.close()

    # --- final adapter and summary ---
    if accelerator.is_main_process:
        if status != "stopped_bad_steps":
            run_utils.save_adapter_folder(
                model, tokenizer, output_dir / "final", args.model, {"trainer_state.json": state, "config.json": config}
            )
            write_json(output_dir / "update_ratios.json", lora_update_ratios(model))
        steps = (
            [json.loads(line) for line in open(output_dir / "train_log.jsonl")]
            if (output_dir / "train_log.jsonl").exists()
            else []
        )
        steps = [s for s in steps if s.get("type") == "step" and not s["skipped"]]
        summary = {
            "status": status,
            "stop_reason": stop_reason,
            "global_step": state["global_step"],
            "epochs_completed": state["epoch"],
            "best_step": state["best_step"],
            "best_epoch": state["best_epoch"],
            "best_val_ppl": math.exp(state["best_val_loss"]) if state["best_val_loss"] is not None else None,
            "baseline_val_ppl": state["baseline_val_ppl"],
            "train_time_s": state["train_time_s"],
            "bad_steps_total": state["bad_steps_total"],
            "tokens_per_s": sum(s["tokens"] for s in steps)
            / max(sum(s["tokens"] / s["tokens_per_s"] for s in steps), 1e-9)
            if steps
            else None,
            "mfu": sum(s["mfu"] for s in steps) / len(steps) if steps else None,
            "peak_mem_mb": run_utils.peak_memory_mb(accelerator.device),
            "trainable_pct": params["trainable_pct"],
        }
        write_json(output_dir / "summary.json", summary)
        logger.info(
            f"done: {status}{' (' + stop_reason + ')' if stop_reason else ''} | best val ppl {summary['best_val_ppl']} at step {summary['best_step']} (baseline {summary['baseline_val_ppl']})"
        )
    accelerator.end_training()
    run_utils.release_lock(lock)
    if status == "stopped_bad_steps":
        sys.exit(f"error: training stopped: {stop_reason}")
    return json.loads((output_dir / "summary.json").read_text()) if (output_dir / "summary.json").exists() else {}


if __name__ == "__main__":
    main()
