"""Generation vs training throughput of the same model on this machine, in one sitting.

    python benchmarks/generation.py --adapter runs/demo/best                  # test split, all replies
    python benchmarks/generation.py --adapter runs/demo/best --limit 20 --compare-generate
    python benchmarks/generation.py --adapter runs/demo/best --own-history    # as make demo evaluates

Two fresh subprocesses, one after the other, both on the adapter's base model with its LoRA config:
- training: `train.py` for `--train-steps` updates of the adapter run's own recipe (batch size,
  targets, rank, dropout, `--compile`, precision auto); tokens/s = non-padding tokens / step seconds over
  the steps after the first (warm-up; a compiled run: after the first half, which compiles), from its
  train_log.jsonl;
- generation: `evaluate.py --adapter ... --no-base` on `--split` (final replies + asking turns, its
  default generation settings; `--own-history`: every assistant turn generated with the model's own
  earlier replies, as `make demo` evaluates); tokens/s = useful new tokens (up to and including each
  reply's end-of-turn) / generation seconds, from its metrics.json.
It prints both and the ratio generation / training, and appends a section to --output.

`--compare-generate` also times the plain path in this process on the same prompts
(`model.generate` in length-sorted batches of 8, adapter unmerged: train.py's samples, and what
evaluate.py did before continuous batching) and counts the replies that are identical to evaluate.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.jsonio import read_json, read_jsonl  # noqa: E402  (the repo root must be on sys.path first)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder of a train.py run (e.g. runs/demo/best)")
    parser.add_argument("--split", default="test", choices=["validation", "test"], help="data/<split>.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--train-steps", type=int, default=None, help="updates run (default 12, compiled 60)")
    parser.add_argument("--compare-generate", action="store_true", help="also time the previous generate() path")
    parser.add_argument("--own-history", action="store_true", help="evaluate.py --own-history (as make demo)")
    parser.add_argument("--skip-training", action="store_true", help="time the generation only (no ratio)")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/generation.md"), help="markdown to append")
    return parser.parse_args(argv)


def run_logged(command: list[str], log: Path) -> None:
    """Run a child process with its output in `log`; exit with the log's tail if it fails."""
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"error: {' '.join(command[1:3])} failed ({code}); log {log}:\n{log.read_text()[-2000:]}")


def training_throughput(adapter: Path, steps: int, work: Path) -> dict:
    """Time `steps` updates (None: 12, or 60 compiled) of train.py with the adapter run's recipe; tokens/s after
    the first update (compiled: after the first half)."""
    config = read_json(adapter / "config.json")["args"]
    compiled = bool(config.get("compile"))
    steps = steps or (60 if compiled else 12)
    recipe = ["--target-modules", str(config["target_modules"]), "--rank", str(config["rank"])]
    recipe += ["--dropout", str(config["dropout"])] + ["--compile"] * compiled
    recipe += ["--alpha", str(config["alpha"]), "--batch-size", str(config["batch_size"])]
    recipe += ["--effective-batch-size", str(config["effective_batch_size"]), "--lr", str(config["lr"])]
    run_dir = work / "train"
    command = [sys.executable, "train.py", "--model", config["model"], "--output-dir", str(run_dir)]
    command += [*recipe, "--max-steps", str(steps), "--no-baseline", "--num-samples", "0", "--report-to", "none"]
    command += ["--eval-batch-size", "8", "--save-total-limit", "1"]
    run_logged(command, work / "train.log")
    skip = steps // 2 if compiled else 1
    records = [r for r in read_jsonl(run_dir / "train_log.jsonl") if r.get("type") == "step"][skip:]
    tokens = sum(r["tokens"] for r in records)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in records)
    return {"steps": len(records), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def generation_throughput(adapter: Path, split: str, limit: int | None, work: Path, own_history: bool = False) -> dict:
    """evaluate.py on the finetuned model only; its generation figures from metrics.json."""
    command = [sys.executable, "evaluate.py", "--adapter", str(adapter), "--split", split, "--no-base"]
    command += ["--own-history"] if own_history else []
    command += ["--output-dir", str(work / "eval"), "--bootstrap", "10"]
    command += ["--limit", str(limit)] if limit else []
    run_logged(command, work / "evaluate.log")
    metrics = read_json(work / "eval" / "metrics.json")
    generation = metrics["models"]["finetuned"]["generation"]
    replies = [p["generated_finetuned"] for p in read_jsonl(work / "eval" / "predictions.jsonl")]
    asks = [p["generated_finetuned"] for p in read_jsonl(work / "eval" / "extra_predictions.jsonl")]
    return generation | {"settings": metrics["settings"], "texts": replies + asks}


def previous_generate(adapter: Path, split: str, limit: int | None, settings: dict) -> tuple[list[str], float, int]:
    """The plain path: `model.generate` per length-sorted batch of 8, adapter unmerged.

    That is `common.generation.generate_batches` (train.py's sample replies; evaluate.py before
    continuous batching).

    Returns:
        (replies in evaluate.py's order: final replies then asking turns, seconds, useful new tokens).
    """
    import torch
    from peft import PeftModel

    from common.artifacts import saved_chat_template
    from common.data import load_records
    from common.generation import encode_prompts, end_of_turn_ids, generate_batches, prompt_messages
    from common.model import load_model_and_tokenizer

    base = read_json(adapter / "config.json")["args"]["model"]
    dtype = getattr(torch, settings["dtype"])
    model, tokenizer = load_model_and_tokenizer(base, dtype=dtype, chat_template=saved_chat_template(adapter))
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    records = load_records(REPO / "data" / f"{split}.jsonl")[:limit]
    prompts = [prompt_messages(r["messages"]) for r in records]
    for record in records:  # the asking turns, as data/task.py's extra_prompts lists them
        turns = [i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"][:-1]
        prompts += [record["messages"][:i] for i in turns[: len(record.get("ask_facts") or [])]]
    ids, stop = encode_prompts(tokenizer, prompts), end_of_turn_ids(tokenizer)
    replies, useful = [""] * len(ids), 0
    start = time.perf_counter()
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with torch.no_grad(), autocast:
        for i, new in generate_batches(model, ids, stop, 8, settings["max_new_tokens"], tokenizer.pad_token_id):
            replies[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            useful += len(new)  # up to and including the end-of-turn token
    return replies, time.perf_counter() - start, useful


def render(result: dict) -> str:
    """The markdown section appended to --output."""
    train, gen = result["training"], result["generation"]
    history = ", own history" if result.get("own_history") else ""
    lines = [f"## {result['date']} | {result['machine']} | {result['adapter']} on {result['split']}", ""]
    lines += ["| what | tokens | seconds | tokens/s |", "|---|---|---|---|"]
    if train:
        lines.append(
            f"| training (train.py, {train['steps']} timed updates) | {train['tokens']} | {train['seconds']:.1f} | "
            f"{train['tokens_per_s']:.1f} |"
        )
    lines.append(
        f"| generation (evaluate.py{history}, {gen['replies']} replies, useful new tokens) | {gen['new_tokens']} | "
        f"{gen['seconds']:.1f} | {gen['tokens_per_s']:.1f} |"
    )
    if "previous" in result:
        prev = result["previous"]
        lines.append(
            f"| previous generate() path (batches of 8, unmerged) | {prev['new_tokens']} | {prev['seconds']:.1f} | "
            f"{prev['tokens_per_s']:.1f} |"
        )
    lines += ["", f"generation / training = **{result['ratio']:.2f}**" if train else "training not timed"]
    if "previous" in result:
        prev = result["previous"]
        lines.append(
            f"; continuous batching / previous = {gen['tokens_per_s'] / prev['tokens_per_s']:.2f}x; "
            f"identical replies {prev['identical']} of {gen['replies']}"
        )
    return "\n".join(lines) + "\n\n"


def main(argv: list[str] | None = None) -> dict:
    """Run both measurements and report them."""
    args = parse_args(argv)
    from benchmarks.throughput import describe_machine

    adapter = Path(args.adapter).resolve()
    if not (adapter / "config.json").is_file():
        sys.exit(f"error: {adapter} has no config.json: pass an adapter folder written by train.py (runs/<run>/best)")
    with tempfile.TemporaryDirectory(prefix="bench-generation-") as tmp:
        work = Path(tmp)
        training = None if args.skip_training else training_throughput(adapter, args.train_steps, work)
        generation = generation_throughput(adapter, args.split, args.limit, work, args.own_history)
    texts = generation.pop("texts")
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": describe_machine(),
        "adapter": str(Path(args.adapter)),
        "split": args.split,
        "own_history": args.own_history,
        "threads": int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))),  # torch in the children
        "training": training,
        "generation": generation,
        "ratio": generation["tokens_per_s"] / training["tokens_per_s"] if training else None,
    }
    if args.compare_generate:
        replies, seconds, useful = previous_generate(adapter, args.split, args.limit, generation["settings"])
        identical = sum(a == b for a, b in zip(replies, texts, strict=True))
        result["previous"] = {"seconds": seconds, "new_tokens": useful, "tokens_per_s": useful / seconds}
        result["previous"]["identical"] = identical
    report = render(result)
    print(report)
    with open(args.output, "a") as handle:
        handle.write(report)
    Path(args.output).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
