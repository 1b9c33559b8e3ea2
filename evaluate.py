"""Evaluate a LoRA adapter against its base model, or write a run's convergence report.

    python evaluate.py --adapter runs/demo/best --split test            # base vs finetuned -> runs/demo/eval/
    python evaluate.py --adapter runs/demo/best --data-file my.jsonl --limit 50 --output-dir /tmp/eval
    python evaluate.py --model smollm2-135m-instruct --split validation  # the base model alone -> runs/base-eval/
    python evaluate.py --report runs/demo                                # convergence report -> runs/demo/report/

Adapter mode loads the base model once, adds the adapter, and measures both models on the same
examples: with the adapter, and inside `model.disable_adapter()` (the untouched base).
- mean cross-entropy and perplexity over assistant tokens, with a bootstrap 95% interval that
  resamples examples, and the paired finetuned-minus-base difference on the same resamples
- greedy generation of the final assistant reply and of the task's extra prompts in one continuous
  batch (common/fast_generation.py: finished rows leave at once, a conversation's prompts share one
  prefill, the adapter is merged while it runs; a reply that writes the same span of 8+ tokens 3
  times in a row ends there, `--loop-repeats`), ROUGE-1/2/L against the reference reply
- the task's own metrics from the task module (`--task`, default data/task.py, see docs/task.md):
  data/task.py scores each reply's decision line (per line of business, with confusion matrices)
  and the asking turns it adds as extra prompts, and counts the turns that ask again for a given fact
It writes metrics.json, predictions.jsonl (one line per example: reference and both replies),
extra_predictions.jsonl (the replies to the task's extra prompts) and report.md (the comparison
table). The base model's outputs are cached (common/eval_cache.py, keyed by the base model's files,
the data, the prompts, the generation settings, the precision and the package versions) and reused
by the next evaluation with the same key: the log and metrics.json say so; `--no-cache` recomputes
them. If `--model` is given and differs from the adapter's base model, it exits with an error
instead of scoring the adapter on the wrong weights.

Report mode reads only the run's logs (see docs/run_folder.md) and writes PNG plots and report.md:
convergence verdict, overfitting, optimal epoch, gradient health, dead adapters, recommendations.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from common.artifacts import open_adapter, precision_autocast, saved_chat_template
from common.checkpoint import CheckpointError
from common.cli import load_task
from common.data import (
    DataError,
    collate_batch,
    dataset_sha256,
    hold_out_validation,
    load_records,
    read_run_record,
    tokenize_records,
)
from common.eval_cache import cache_key, entry_path, load_entry, model_digest, save_entry
from common.fast_generation import LOOP_SPAN, GenerationStats, generate_replies
from common.generation import prompt_messages
from common.jsonio import write_json, write_jsonl
from common.loss import compute_token_losses
from common.metrics import (
    bootstrap_indices,
    bootstrap_ratio_ci,
    perplexity_from_loss_ci,
    render_eval_report,
    rouge_scores,
)
from common.model import (
    DEFAULT_MODEL,
    ModelLoadError,
    load_config,
    load_model_and_tokenizer,
    resolve_model_path,
)
from common.precision import PrecisionChoice, resolve_precision
from common.report import ReportError, analyze_run, load_run_logs, plot_run, render_report

REPO = Path(__file__).resolve().parent
logger = logging.getLogger("evaluate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (see the module docstring).

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The parsed flags.

    Raises:
        SystemExit: a flag is out of range or flags conflict (exit code 2, with the reason).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- what to evaluate ---
    parser.add_argument("--adapter", help="adapter folder (e.g. runs/<run>/best): compare it with its base model")
    parser.add_argument(
        "--model", help=f"base model alias/folder/hub id (default: the adapter's base, else {DEFAULT_MODEL})"
    )
    parser.add_argument("--report", metavar="RUN_DIR", help="write the convergence report of runs/<run> from its logs")
    # --- data ---
    split_help = (
        "data/<split>.jsonl (default test); for a run that held out a validation split of its "
        "--train-file: that part of the file (default validation)"
    )
    parser.add_argument("--split", choices=["train", "validation", "test"], help=split_help)
    parser.add_argument("--data-file", help="evaluate this file instead of --split")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--task", default=str(REPO / "data" / "task.py"), help="the task module (docs/task.md)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="longer examples lose their oldest turns")
    # --- generation ---
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward pass of the loss")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="replies decoded together at most")
    parser.add_argument("--max-new-tokens", type=int, default=400, help="tokens per reply (data/task.py's ~275)")
    loop_help = f"end a reply that writes the same span of {LOOP_SPAN}+ tokens this many times in a row (0: never)"
    parser.add_argument("--loop-repeats", type=int, default=3, help=loop_help)
    extra_help = "skip the task's extra prompts (data/task.py: the asking turns)"
    parser.add_argument("--no-extra-prompts", "--no-ask-turns", action="store_true", help=extra_help)
    own_help = "each prompt's earlier assistant turns are the model's own replies, generated turn by turn"
    parser.add_argument("--own-history", action="store_true", help=own_help)
    parser.add_argument("--no-base", action="store_true", help="with --adapter: score only the finetuned model")
    parser.add_argument("--no-cache", action="store_true", help="recompute the base model's results (and re-cache)")
    dtype_help = "model and autocast dtype (auto: the fastest measured on this CPU, bf16/fp16 on a GPU)"
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help=dtype_help)
    # --- statistics and output ---
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--seed", type=int, default=1234, help="seeds the bootstrap and torch")
    parser.add_argument("--output-dir", help="default: <adapter>/../eval, runs/base-eval, or <run>/report")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template (default: the adapter's own)")
    args = parser.parse_args(argv)
    if args.report and args.adapter:
        parser.error("--report reads a run's logs; do not combine it with --adapter")
    if args.loop_repeats < 0 or args.loop_repeats == 1:
        parser.error(f"--loop-repeats must be 0 (never) or at least 2, got {args.loop_repeats}")
    for name in ("limit", "batch_size", "gen_batch_size", "max_new_tokens", "bootstrap", "max_seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
    return args


def find_recorded_split(adapter_dir: Path) -> dict | None:
    """The validation split the adapter's run held out of its --train-file, if it held one out.

    Args:
        adapter_dir: runs/<run>/best (its config.json), a checkpoint, or an export (training_args.json).

    Returns:
        The split record from the run's config.json (see `common.data.hold_out_validation`), or None.
    """
    for config_file in (
        adapter_dir / "config.json",
        adapter_dir / "training_args.json",
        adapter_dir.parent / "config.json",
    ):
        split = read_run_record(config_file, "dataset", "validation_split")
        if split is not None:
            return split
    return None


def same_model(a: str, b: str) -> bool:
    """True when two model names point to the same weights (alias, its cache folder, or equal paths).

    Args:
        a, b: aliases, local folders or hub ids.

    Returns:
        Whether they resolve to the same model.
    """
    if a == b:
        return True
    try:
        return Path(resolve_model_path(a)).resolve() == Path(resolve_model_path(b)).resolve()
    except ModelLoadError:
        return False


def local_model_folder(name_or_path: str) -> Path:
    """The folder holding a model's files (a hub id: its snapshot in the local Hugging Face cache).

    Raises:
        ModelLoadError: a hub id that is not in the local cache.
    """
    resolved = resolve_model_path(name_or_path)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as err:  # not downloaded: huggingface_hub raises one of several errors
        raise ModelLoadError(f"model '{resolved}' is not in the local Hugging Face cache ({err})") from err


@torch.no_grad()
def compute_example_losses(
    model, examples: list[dict], pad_token_id: int, batch_size: int, precision: PrecisionChoice, progress=None
):
    """Summed assistant-token loss and trained-token count of every example (batched by length).

    Args:
        model: the (PEFT) causal LM, in eval mode.
        examples: from `tokenize_records` (input_ids, labels with -100 outside assistant turns).
        pad_token_id: id used for right padding (labels are padded with -100).
        batch_size: examples per forward pass.
        precision: from `common.precision.resolve_precision` (its autocast is used).
        progress: label of a tqdm bar with the scored tokens/s (None: no bar).

    Returns:
        (loss_sums, token_counts) as float64 numpy arrays aligned with `examples`.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    loss_sums, counts = np.zeros(len(examples)), np.zeros(len(examples))
    bar = tqdm(total=len(order), desc=progress, unit="example", disable=progress is None)
    tokens, start_time = 0, time.perf_counter()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_batch([examples[i] for i in rows], pad_token_id).items()}
        with precision_autocast(precision):
            loss_sum, count = compute_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss_sums[rows] = loss_sum.double().cpu().numpy()
        counts[rows] = count.double().cpu().numpy()
        tokens += sum(len(examples[i]["input_ids"]) for i in rows)
        bar.update(len(rows))
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - start_time):.0f} tok/s")
    bar.close()
    return loss_sums, counts


def mean_scores(task: ModuleType, replies: list[str], records: list[dict], n_resamples: int, seed: int) -> dict:
    """A task without `evaluate_replies`: the mean and 95% interval of each `score_reply` key.

    Returns:
        {"scores": {"n": replies scored, key: `bootstrap_ratio_ci` dict, ...}}, or {} when none is
        scored; a key missing from some reply's scores counts 0 there, as in train.py's samples.
    """
    scores = [s for s in map(task.score_reply, replies, records) if s is not None]
    if not scores:
        return {}
    indices = bootstrap_indices(len(scores), n_resamples, seed)
    keys = dict.fromkeys(k for s in scores for k in s)
    return {
        "scores": {"n": len(scores)}
        | {k: bootstrap_ratio_ci([s.get(k, 0.0) for s in scores], indices=indices) for k in keys}
    }


def score_model(outputs: dict, targets: dict, indices: np.ndarray, task: ModuleType, args) -> dict:
    """Every metric of one model: loss and perplexity with intervals, ROUGE, and the task's metrics.

    Args:
        outputs: the model's `run_model` outputs (per-example losses, replies, extra replies).
        targets: from `generation_targets`.
        indices: shared `bootstrap_indices`, so both models are resampled identically.
        task: the task module; its `evaluate_replies` (with the extra replies, when generated), else
            `mean_scores`, gets `args.bootstrap` resamples seeded with `args.seed`, the same for both models: paired.

    Returns:
        {"loss", "perplexity", "trained_tokens", "rouge", and the task's keys (docs/task.md)}.
    """
    loss = bootstrap_ratio_ci(outputs["loss_sums"], outputs["counts"], indices=indices)
    result = {"loss": loss, "perplexity": perplexity_from_loss_ci(loss), "trained_tokens": int(outputs["counts"].sum())}
    if outputs["replies"]:
        result["rouge"] = rouge_scores(outputs["replies"], targets["references"])
    if hasattr(task, "evaluate_replies"):
        extra = {"extra_replies": outputs["extra_replies"]} if targets["extras"] else {}
        result |= task.evaluate_replies(outputs["replies"], targets["chats"], args.bootstrap, args.seed, **extra)
    else:
        result |= mean_scores(task, outputs["replies"], targets["chats"], args.bootstrap, args.seed)
    return result


def write_convergence_report(run_dir: Path, output_dir: Path) -> dict:
    """Analyse a run folder's logs and write plots, report.md and analysis.json into `output_dir`.

    Args:
        run_dir: runs/<run>, as train.py wrote it.
        output_dir: where the report goes (created).

    Returns:
        The analysis (verdicts and the numbers behind them).

    Raises:
        SystemExit: the run folder or its logs are missing.
    """
    try:
        logs = load_run_logs(run_dir)
    except ReportError as err:
        sys.exit(f"evaluate.py: error: {err}")
    analysis = analyze_run(logs)
    plots = plot_run(logs, output_dir)  # creates output_dir
    (output_dir / "report.md").write_text(render_report(analysis, plots))
    write_json(output_dir / "analysis.json", analysis)
    logger.info(
        "convergence: %s | overfitting: %s | report: %s",
        analysis["convergence"]["verdict"],
        analysis["overfitting"].get("overfitting"),
        output_dir / "report.md",
    )
    return analysis


def resolve_model(args: argparse.Namespace) -> tuple[Path | None, str]:
    """The adapter folder (checked) and the base model to load: the adapter's own base unless --model.

    Raises:
        SystemExit: the adapter folder is unusable, or it was trained on another base than --model.
    """
    adapter_dir = Path(args.adapter) if args.adapter else None
    if adapter_dir is None:
        return None, args.model or DEFAULT_MODEL
    try:  # the one check of an adapter folder that export.py and merge_and_load.py use too
        adapter_base = open_adapter(adapter_dir).base_model
    except CheckpointError as err:
        sys.exit(f"evaluate.py: error: {err}")
    if args.model and not same_model(args.model, adapter_base):
        sys.exit(
            f"evaluate.py: error: adapter {adapter_dir} was trained on '{adapter_base}', not on --model "
            f"'{args.model}'; drop --model or pass the matching base model"
        )
    return adapter_dir, adapter_base


def resolve_data(args: argparse.Namespace, adapter_dir: Path | None) -> tuple[Path, dict | None]:
    """The data file to score, and the validation split its run held out of it (None if it held none).

    Raises:
        SystemExit: --split test for a run that has only its held-out split.
    """
    # A run given only its own --train-file validated on a held-out split of it: evaluate that same split.
    held_out = find_recorded_split(adapter_dir) if adapter_dir is not None and not args.data_file else None
    if held_out is not None and args.split == "test":
        sys.exit(
            f"evaluate.py: error: {adapter_dir}'s run held out its validation split from {held_out['source']} and "
            "has no test file; pass --data-file FILE, or --split validation (the held-out examples)"
        )
    data_file = Path(
        held_out["source"] if held_out else args.data_file or REPO / "data" / f"{args.split or 'test'}.jsonl"
    )
    return data_file, held_out


def load_records_part(data_file: Path, held_out: dict | None, split: str | None) -> list[dict]:
    """The records of `data_file`; of a run's held-out split, its training or validation part only."""
    records = load_records(data_file)
    if held_out is None:
        return records
    fraction, split_seed = held_out["fraction"], held_out["seed"]
    train_part, validation_part, _ = hold_out_validation(records, fraction, split_seed, str(data_file), held_out)
    records = train_part if split == "train" else validation_part
    part = "training" if split == "train" else "held-out validation"
    logger.info("%s: the %d %s examples of the run's split (seed %d)", data_file, len(records), part, split_seed)
    return records


@dataclass
class EvalInputs:
    """What is evaluated: the model (with the adapter), its tokenizer and precision, the records and examples."""

    model_name: str
    adapter_dir: Path | None
    data_file: Path
    held_out: dict | None  # the validation split the adapter's run held out of data_file, if any
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    precision: PrecisionChoice
    records: list[dict]
    examples: list[dict]  # the tokenized records that fit --max-seq-len
    stats: object  # tokenize_records' counts (truncated history, dropped overlong)


def load_inputs(
    args: argparse.Namespace, model_name: str, adapter_dir: Path | None, data_file: Path, held_out, device
) -> EvalInputs:
    """Load the model (with the adapter), the tokenizer and the tokenized records.

    Raises:
        SystemExit: the model or the data cannot be loaded, or no example fits --max-seq-len.
    """
    try:
        # The rule every script shares (common/precision.py); the base is loaded in the chosen dtype.
        config = load_config(model_name, trust_remote_code=args.trust_remote_code)
        precision = resolve_precision(args.dtype, device, config, measure_peak=False, logger=logger)
        logger.info(precision.describe())
        # The template the adapter was trained with (saved next to it) unless --chat-template overrides it.
        chat_template = args.chat_template or (saved_chat_template(adapter_dir) if adapter_dir else None)
        model, tokenizer = load_model_and_tokenizer(
            model_name, dtype=precision.dtype, trust_remote_code=args.trust_remote_code, chat_template=chat_template
        )
        records = load_records_part(data_file, held_out, args.split)[: args.limit]
        examples, stats = tokenize_records(records, tokenizer, args.max_seq_len)
    except (ModelLoadError, DataError) as err:
        sys.exit(f"evaluate.py: error: {err}")
    if not examples:
        sys.exit(f"evaluate.py: error: no example of {data_file} fits --max-seq-len {args.max_seq_len}")
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.to(device).eval()
    return EvalInputs(
        model_name, adapter_dir, data_file, held_out, device, model, tokenizer, precision, records, examples, stats
    )


def generation_targets(records: list[dict], task: ModuleType, no_extra_prompts: bool) -> dict:
    """What is generated and scored: each chat record's final assistant turn, and the task's extra prompts.

    Returns:
        {"chat_rows", "chats", "prompts", "references", "extras"}: the prompt is everything before
        the final assistant turn, the reference that turn; "extras" are the task's `extra_prompts`.
    """
    chat_rows = [i for i, r in enumerate(records) if "messages" in r]
    chats = [records[i] for i in chat_rows]
    prompts = [prompt_messages(r["messages"]) for r in chats]
    extras = [] if no_extra_prompts or not hasattr(task, "extra_prompts") else task.extra_prompts(chats)
    return {
        "chat_rows": chat_rows,
        "chats": chats,
        "prompts": prompts,
        "references": [r["messages"][len(p)]["content"] for r, p in zip(chats, prompts)],
        "extras": extras,
    }


def own_history_replies(generate, chats: list[dict], extras: list[dict]) -> tuple[list[str], list[str]]:
    """Replies whose prompts carry the model's own earlier assistant turns (what a deployed model sees).

    Every assistant turn of each chat is generated: the prompt of turn k is the conversation before
    it, with turns 1..k-1 replaced by the model's replies there (the user turns stay as recorded).
    Turn k+1's prompt is handed to `generate` as a follow-up the moment turn k's reply ends, so all
    turns run in one continuous batch. An extra prompt that is a chat's conversation before one of
    its assistant turns gets that turn's reply; any other extra prompt is generated as recorded.

    Args:
        generate: `generate(prompts, follow_up)` -> replies, as `generate_replies` with its
            `follow_up` argument (the replies of `prompts`, then those of the follow-ups, in order).
        chats: the chat records.
        extras: the task's extra prompts ({"messages", ...}).

    Returns:
        (the final replies, aligned with `chats`; the extra replies, aligned with `extras`).
    """
    turns = [[i for i, m in enumerate(chat["messages"]) if m["role"] == "assistant"] for chat in chats]
    own: list[dict[int, str]] = [{} for _ in chats]

    def prompt(c: int, k: int) -> list[dict]:
        end = turns[c][k]
        return [{**m, "content": own[c].get(i, m["content"])} for i, m in enumerate(chats[c]["messages"][:end])]

    owners = [(c, 0) for c, positions in enumerate(turns) if positions]  # (chat, turn number) of each prompt

    def follow_up(index: int, reply: str) -> list[dict] | None:
        c, k = owners[index]
        own[c][turns[c][k]] = reply
        if k + 1 == len(turns[c]):
            return None
        owners.append((c, k + 1))
        return prompt(c, k + 1)

    generate([prompt(c, 0) for c, _ in owners], follow_up)
    finals = [own[c][positions[-1]] for c, positions in enumerate(turns)]
    extra_replies: list[str | None] = []
    for extra in extras:
        end = len(extra["messages"])
        chat = next(
            (c for c, chat in enumerate(chats) if end in own[c] and chat["messages"][:end] == extra["messages"]), None
        )
        extra_replies.append(None if chat is None else own[chat][end])
    unmatched = [j for j, reply in enumerate(extra_replies) if reply is None]
    for j, reply in zip(unmatched, generate([extras[j]["messages"] for j in unmatched], None), strict=True):
        extra_replies[j] = reply
    return finals, extra_replies


def run_model(name: str, inputs: EvalInputs, targets: dict, args, adapter_off: bool) -> dict:
    """One model's per-example losses, replies and extra replies (the adapter disabled for the base).

    The final replies and the extra prompts are generated in one continuous batch (with --own-history,
    every turn of every chat, each turn's prompt joining when the turn before it ends:
    `own_history_replies`).

    Returns:
        {"loss_sums", "counts", "replies", "extra_replies", "generation": useful new tokens, prompt
        tokens, seconds and tokens/s of the generation}.
    """
    model, tokenizer, examples, precision = inputs.model, inputs.tokenizer, inputs.examples, inputs.precision
    logger.info("%s: scoring %d examples, generating %d replies", name, len(examples), len(targets["prompts"]))
    prompts = targets["prompts"] + [extra["messages"] for extra in targets["extras"]]
    stats = GenerationStats()
    with model.disable_adapter() if adapter_off else contextlib.nullcontext():
        loss_sums, counts = compute_example_losses(
            model, examples, tokenizer.pad_token_id, args.batch_size, precision, progress=f"{name}: scoring"
        )
        with precision_autocast(precision):

            def generate(turn_prompts: list[list[dict]], progress: str, follow_up=None) -> list[str]:
                size, budget = args.gen_batch_size, args.max_new_tokens
                return generate_replies(
                    model,
                    tokenizer,
                    turn_prompts,
                    size,
                    budget,
                    progress=progress,
                    stats=stats,
                    follow_up=follow_up,
                    loop_repeats=args.loop_repeats,
                )

            if args.own_history:
                own = f"{name}: generating (own history)"
                finals, extra_replies = own_history_replies(
                    lambda turn_prompts, follow_up: generate(turn_prompts, own, follow_up),
                    targets["chats"],
                    targets["extras"],
                )
                replies = finals + extra_replies
            else:
                replies = generate(prompts, f"{name}: generating (+ {len(targets['extras'])} extra prompts)")
    logger.info(
        "%s: generated %d useful new tokens in %.1f s (%.1f tok/s; %d prompt tokens, %d reused from the previous turn's KV cache; %d replies ended in a loop)",
        name,
        stats.new_tokens,
        stats.seconds,
        stats.tokens_per_s,
        stats.prompt_tokens,
        stats.cached_tokens,
        stats.looped,
    )
    split = len(targets["prompts"])
    generation = vars(stats) | {"tokens_per_s": stats.tokens_per_s}
    return {
        "loss_sums": loss_sums,
        "counts": counts,
        "replies": replies[:split],
        "extra_replies": replies[split:],
        "generation": generation,
    }


def base_cache_key(args, inputs: EvalInputs, targets: dict) -> tuple[str, dict]:
    """The cache key of the base model's evaluation: model files, data, prompts, settings, precision, packages.

    Returns:
        (key, the parts it was computed from), as `common.eval_cache.cache_key`.

    Raises:
        ModelLoadError: the base model has no local folder (not downloaded).
    """
    # The extra prompts come from the task module, not from the data file alone: their digest is in the key.
    extra_messages = json.dumps([extra["messages"] for extra in targets["extras"]], sort_keys=True)
    parts = {
        "model": model_digest(local_model_folder(inputs.model_name)),
        "chat_template": inputs.tokenizer.chat_template,
        "data": {
            "sha256": dataset_sha256(inputs.data_file),
            "held_out": inputs.held_out,
            "split": args.split,
            "limit": args.limit,
        },
        "settings": {
            "max_seq_len": args.max_seq_len,
            "batch_size": args.batch_size,
            "gen_batch_size": args.gen_batch_size,
            "max_new_tokens": args.max_new_tokens,
            "loop_repeats": args.loop_repeats,
            "loop_span": LOOP_SPAN,
            "extra_prompts": hashlib.sha256(extra_messages.encode()).hexdigest(),
            **({"own_history": True} if args.own_history else {}),  # absent: keys cached before the flag still hit
        },
        "precision": {"precision": inputs.precision.precision, "dtype": str(inputs.precision.dtype)},
    }
    return cache_key(parts)


def run_base_cached(key: str, parts: dict, run, no_cache: bool) -> dict:
    """The base model's outputs from the cache, else from `run()` (then cached).

    Returns:
        The outputs of `run_model`, with "cache": {"used", "file", "key"}.
    """
    entry = None if no_cache else load_entry(key)
    if entry is not None:
        outputs = entry["outputs"]
        outputs["loss_sums"], outputs["counts"] = np.array(outputs["loss_sums"]), np.array(outputs["counts"])
        file = str(entry_path(key))
        logger.info("base: reusing the cached evaluation %s (same model files, data, settings, packages)", file)
        return outputs | {"cache": {"used": True, "file": file, "key": key}}
    outputs = run()
    stored = outputs | {"loss_sums": outputs["loss_sums"].tolist(), "counts": outputs["counts"].tolist()}
    file = str(save_entry(key, parts, stored))
    logger.info("base: evaluation cached in %s%s", file, " (--no-cache: recomputed)" if no_cache else "")
    return outputs | {"cache": {"used": False, "file": file, "key": key}}


def build_metrics(args, inputs: EvalInputs, targets: dict, results: dict) -> dict:
    """metrics.json: what was evaluated, how, and every model's results."""
    return {
        "mode": "adapter" if inputs.adapter_dir is not None else "base",
        "adapter": str(inputs.adapter_dir) if inputs.adapter_dir else None,
        "model": inputs.model_name,
        "data_file": str(inputs.data_file),
        # a part of the run's --train-file
        "held_out_split": (args.split or "validation") if inputs.held_out else None,
        "task": args.task,
        "examples": len(inputs.records),
        "loss_examples": len(inputs.examples),
        "truncated_history": inputs.stats.truncated_history,
        "dropped_overlong": inputs.stats.dropped_overlong,
        "generation_examples": len(targets["prompts"]),
        "extra_prompts": len(targets["extras"]),
        "settings": {
            "max_new_tokens": args.max_new_tokens,
            "loop_repeats": args.loop_repeats,
            "loop_span": LOOP_SPAN,
            "batch_size": args.batch_size,
            "gen_batch_size": args.gen_batch_size,
            "bootstrap": args.bootstrap,
            "seed": args.seed,
            "dtype": str(inputs.precision.dtype).replace("torch.", ""),
            "precision": inputs.precision.to_json(),
            "max_seq_len": args.max_seq_len,
            "own_history": args.own_history,
            "device": str(inputs.device),
        },
        "models": results,
    }


def compare_models(outputs: dict, results: dict, indices) -> dict:
    """Finetuned vs base on the same examples: the paired loss change and the perplexity ratio."""
    base, tuned = outputs["base"], outputs["finetuned"]
    delta = bootstrap_ratio_ci(tuned["loss_sums"] - base["loss_sums"], base["counts"], indices=indices)
    return {
        "loss_delta": delta,  # finetuned minus base, paired on the same resamples
        "perplexity_ratio": results["finetuned"]["perplexity"]["value"] / results["base"]["perplexity"]["value"],
        "significant": delta["high"] < 0 or delta["low"] > 0,
    }


def write_outputs(output_dir: Path, inputs: EvalInputs, targets: dict, outputs: dict, metrics: dict, task: ModuleType):
    """predictions.jsonl (with each reply's task scores), extra_predictions.jsonl, metrics.json and report.md."""
    output_dir.mkdir(parents=True, exist_ok=True)
    example_of = {e["index"]: row for row, e in enumerate(inputs.examples)}
    predictions = []
    for k, record in enumerate(targets["chats"]):
        row = example_of.get(targets["chat_rows"][k])  # None when the example was dropped as overlong
        line = {"id": record.get("id", record["_line"]), "reference": targets["references"][k]}
        for name, out in outputs.items():
            line[f"generated_{name}"] = out["replies"][k]
            line[f"loss_{name}"] = None if row is None else out["loss_sums"][row] / max(out["counts"][row], 1)
            line[f"score_{name}"] = task.score_reply(out["replies"][k], record)
        if hasattr(task, "prediction_fields"):
            line |= task.prediction_fields(record, {name: out["replies"][k] for name, out in outputs.items()})
        predictions.append(line)
    write_jsonl(output_dir / "predictions.jsonl", predictions, sort_keys=False)
    extra_lines = [
        {key: value for key, value in extra.items() if key != "messages"}
        | {f"generated_{name}": out["extra_replies"][k] for name, out in outputs.items()}
        for k, extra in enumerate(targets["extras"])
    ]
    write_jsonl(output_dir / "extra_predictions.jsonl", extra_lines, sort_keys=False)
    write_json(output_dir / "metrics.json", metrics)
    names = list(metrics["models"])
    task_lines = task.report_lines(metrics["models"], names) if hasattr(task, "report_lines") else []
    (output_dir / "report.md").write_text(render_eval_report(metrics, predictions[:3], task_lines))


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation (or the report).

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        What was written to metrics.json (or, with --report, to analysis.json).

    Raises:
        SystemExit: with a one-line message for a mismatched base model, missing data, model or task file.
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report:
        return write_convergence_report(Path(args.report), Path(args.output_dir or Path(args.report) / "report"))

    # --- resolve the model(s) and check that the adapter belongs to the base ---
    task = load_task(args.task)
    adapter_dir, model_name = resolve_model(args)
    output_dir = Path(args.output_dir or (adapter_dir.parent / "eval" if adapter_dir else "runs/base-eval"))
    data_file, held_out = resolve_data(args, adapter_dir)
    set_seed(args.seed)  # python, numpy, torch and every accelerator's generators
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = load_inputs(args, model_name, adapter_dir, data_file, held_out, device)
    targets = generation_targets(inputs.records, task, args.no_extra_prompts)
    indices = bootstrap_indices(len(inputs.examples), args.bootstrap, args.seed)

    # --- the same examples through both models: adapter on, then adapter off (the base) ---
    results, outputs = {}, {}
    names = ["base", "finetuned"] if adapter_dir is not None else ["base"]
    for name in names[1:] if args.no_base and adapter_dir is not None else names:
        adapter_off = adapter_dir is not None and name == "base"

        def run(name=name, adapter_off=adapter_off):
            return run_model(name, inputs, targets, args, adapter_off)

        if name == "base":
            key, parts = base_cache_key(args, inputs, targets)
            outputs[name] = run_base_cached(key, parts, run, args.no_cache)
        else:
            outputs[name] = run()
        results[name] = score_model(outputs[name], targets, indices, task, args)
        results[name]["generation"] = outputs[name]["generation"]
        if "cache" in outputs[name]:
            results[name]["cache"] = outputs[name]["cache"]
        logger.info(
            "%s: loss %.4f | ppl %.3f", name, results[name]["loss"]["mean"], results[name]["perplexity"]["value"]
        )

    metrics = build_metrics(args, inputs, targets, results)
    if "finetuned" in outputs and "base" in outputs:
        metrics["comparison"] = compare_models(outputs, results, indices)
    metrics["eval_time_s"] = time.perf_counter() - start
    write_outputs(output_dir, inputs, targets, outputs, metrics, task)
    logger.info("wrote %s", output_dir)
    return metrics


if __name__ == "__main__":
    main()
