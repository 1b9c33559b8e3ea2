"""Where a training step's time goes: train.py's LoRA step on real examples, profiled (issue 27, item 3).

    python benchmarks/profile_step.py                                  # all-linear r=16, batch 1, dropout 0.05
    python benchmarks/profile_step.py --target-modules q_proj,k_proj,v_proj --batch-size 4
    python benchmarks/profile_step.py --precision no                   # fp32 instead of the probed choice
    python benchmarks/profile_step.py --dropout 0 --compile            # the demo recipe (train.py --compile)

The step is train.py's: the base loaded in the precision `--precision` resolves to (train.py's probe), LoRA
applied by `common.lora.apply_lora`, the loss of `common.loss.compute_token_losses` under autocast, backward,
clipping and AdamW. Examples are the training split's, taken around its median length, so a step is a
typical one. After `--warmup` steps, `--steps` steps are timed phase by phase (forward, backward, optimizer:
clip + step + zero_grad) and then profiled with torch.profiler, whose ops' own (self) CPU time is summed into
kinds: matmuls, attention, casts and copies, the optimizer's element-wise work, other element-wise work. MFU:
`common.perf.estimate_train_flops` of the timed steps over their seconds, against the fastest probed dtype's
matmul rate, as train.py logs it. The markdown table is printed; `--output FILE` appends it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.data import IGNORE_INDEX, collate_batch, load_records, tokenize_records  # noqa: E402  (the repo root first)
from common.lora import apply_lora, parse_target_modules  # noqa: E402
from common.loss import compute_token_losses  # noqa: E402
from common.model import DEFAULT_MODEL, load_config, load_model_and_tokenizer  # noqa: E402
from common.perf import compile_decoder_layers, count_matmul_params, estimate_train_flops  # noqa: E402
from common.precision import resolve_precision  # noqa: E402
from train import choose_attention  # noqa: E402

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkl_linear", "aten::mkldnn_linear"}
CAST_OPS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::to"}
KINDS = ["matmul", "attention", "casts and copies", "optimizer", "other element-wise and glue"]


def op_kind(name: str, in_optimizer: bool) -> str:
    """The kind an op's own time counts under (`in_optimizer`: it ran inside the optimizer's step)."""
    if in_optimizer:
        return "optimizer"
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "softmax" in name or "flash_attention" in name:
        return "attention"
    if name in CAST_OPS:
        return "casts and copies"
    return "other element-wise and glue"


def typical_batches(
    examples: list[dict], batch_size: int, count: int, pad_token_id: int, near: int | None = None
) -> list[dict]:
    """`count` batches of the examples around length `near` (default: the median), consecutive by length as the
    sampler groups them."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    middle = len(ordered) // 2 if near is None else sum(len(e["input_ids"]) < near for e in ordered)
    start = max(0, min(middle - batch_size * count // 2, len(ordered) - batch_size * count))
    chosen = ordered[start : start + batch_size * count]
    if len(chosen) < batch_size * count:
        raise SystemExit(f"error: {len(examples)} examples cannot fill {count} batches of {batch_size}")
    return [collate_batch(chosen[i * batch_size : (i + 1) * batch_size], pad_token_id) for i in range(count)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--train-file", default=str(REPO / "data" / "train.jsonl"))
    parser.add_argument("--precision", default="auto", help="auto (train.py's probe), no, bf16 or fp16")
    parser.add_argument("--target-modules", default="all-linear")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--attn-implementation", default="auto", choices=["auto", "eager", "sdpa"])
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (train.py's --dropout)")
    parser.add_argument("--compile", action="store_true", help="train.py's --compile: the decoder layers compiled")
    parser.add_argument("--near-length", type=int, help="profile examples around this length (default: the median)")
    parser.add_argument("--warmup", type=int, default=5, help="steps run before timing (excluded)")
    parser.add_argument("--steps", type=int, default=20, help="steps timed, then the same number profiled")
    parser.add_argument("--output", help="append the markdown section to this file")
    return parser.parse_args(argv)


def run_step(model, batch: dict, optimizer, trainable: list, dtype: torch.dtype, clock: dict | None) -> None:
    """One train.py step (autocast forward, backward, clip, AdamW); add each phase's seconds to `clock`."""
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    t0 = time.perf_counter()
    with autocast:
        losses, counts = compute_token_losses(model, **batch)
        loss = losses.sum() / counts.sum()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if clock is not None:
        for phase, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2)):
            clock[phase] += seconds


def profile_kinds(model, batches: list[dict], optimizer, trainable: list, dtype: torch.dtype) -> dict[str, float]:
    """Self CPU seconds per kind of op over `batches`, one step each, under torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            run_step(model, batch, optimizer, trainable, dtype, None)
    # ops inside the optimizer's step: its record_function ("Optimizer.step#AdamW.step") spans them
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name.startswith("Optimizer.step")]
    seconds = defaultdict(float)
    for event in prof.events():
        if event.name.startswith("Optimizer.") or event.name.startswith("ProfilerStep"):
            continue
        inside = any(start <= event.time_range.start < end for start, end in spans)
        seconds[op_kind(event.name, inside)] += event.self_cpu_time_total / 1e6
    return dict(seconds)


def main(argv: list[str] | None = None) -> dict:
    """Profile the step; print (and append to --output) the markdown section; return the figures."""
    args = parse_args(argv)
    choice = resolve_precision(args.precision, torch.device("cpu"), load_config(args.model))
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=choice.dtype)
    model = apply_lora(model, args.rank, 2 * args.rank, args.dropout, parse_target_modules(args.target_modules))
    if args.compile:  # compiled during the warm-up steps (they should cover a few lengths: dynamic shapes)
        compile_decoder_layers(model)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01)
    examples, _ = tokenize_records(load_records(args.train_file), tokenizer, 1024)
    batches = typical_batches(
        examples, args.batch_size, args.warmup + args.steps, tokenizer.pad_token_id, args.near_length
    )
    longest = max(b["input_ids"].shape[1] for b in batches)
    model.set_attn_implementation(choose_attention(args.attn_implementation, torch.device("cpu"), longest))
    for batch in batches[: args.warmup]:
        run_step(model, batch, optimizer, trainable, choice.dtype, None)
    timed, clock, step_seconds = batches[args.warmup :], defaultdict(float), []
    for batch in timed:
        start = time.perf_counter()
        run_step(model, batch, optimizer, trainable, choice.dtype, clock)
        step_seconds.append(time.perf_counter() - start)
    kinds = profile_kinds(model, timed, optimizer, trainable, choice.dtype)

    lengths = [b["attention_mask"].sum(1) for b in timed]
    tokens = int(sum(int(n.sum()) for n in lengths))
    trained = int(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in timed))
    flops = estimate_train_flops(
        count_matmul_params(model), tokens, trained, int(sum(int((n**2).sum()) for n in lengths))
    )
    total = sum(step_seconds)
    figures = {
        "precision": choice.precision,
        "attention": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "tokens_per_s": tokens / total,
        "step_ms_median": 1000 * statistics.median(step_seconds),
        "achieved_tflops": flops / total / 1e12,
        "mfu": flops / total / choice.peak_flops if choice.peak_flops else None,
        "phases": {k: v / total for k, v in clock.items()},
        "kinds": {k: kinds.get(k, 0.0) / sum(kinds.values()) for k in KINDS},
    }
    section = render(args, choice, figures, tokens / len(timed))
    print(section)
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n" + section)
    return figures


def render(args: argparse.Namespace, choice, figures: dict, mean_tokens: float) -> str:
    """The markdown section: setup, rate, MFU, phases and kinds of op."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    mfu = f"{figures['mfu']:.1%}" if figures["mfu"] is not None else "n/a"
    lines = [
        f"### {stamp}: {args.target_modules} r={args.rank}, batch {args.batch_size}, {choice.precision}, "
        f"{figures['attention']} attention, LoRA dropout {args.dropout}{', compiled' if args.compile else ''}",
        "",
        f"{choice.describe()}",
        "",
        f"{figures['threads']} thread(s), {args.steps} steps of {mean_tokens:.0f} tokens on average after "
        f"{args.warmup} warm-up: {figures['tokens_per_s']:.1f} tokens/s, median step "
        f"{figures['step_ms_median']:.0f} ms, {figures['achieved_tflops']:.3f} TFLOP/s, MFU {mfu}",
        "",
        "| phase | share of step time |",
        "|---|---|",
        *[f"| {k} | {v:.1%} |" for k, v in figures["phases"].items()],
        "",
        "| kind of op (self CPU time, profiled steps) | share |",
        "|---|---|",
        *[f"| {k} | {v:.1%} |" for k, v in figures["kinds"].items()],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
