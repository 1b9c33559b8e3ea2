"""Run a small grid of train.py configurations one after the other and compare them.

    python sweep.py --grid lr=1e-4,2e-4,3e-4 rank=8,16 epochs=3
    python sweep.py --grid lr=1e-4,3e-4 --subset 100 --name lr-probe -- --max-steps 50 --report-to none
    python sweep.py --grid lr=1e-4,3e-4 --name lr-probe --summary-only    # rebuild the table from the logs

Every `key=v1,v2` is a train.py flag (`--key v`, underscores become dashes); the grid is their
Cartesian product. Arguments after `--` go unchanged to every run (e.g. `--model`, `--train-file`,
`--max-steps`); `--subset N` trains each configuration on the first N training examples.
Your own `--train-file` without a `--validation-file`: as in train.py, each run holds out a seeded
share of it (`--validation-split`, default 0.1) for validation; the sweep passes the same
`--validation-split-seed` to every configuration, so all of them validate on the same examples.

Each configuration trains into `sweeps/<name>/<config>` (e.g. `sweeps/lr-probe/lr=1e-4_rank=8`) via
`python train.py --output-dir sweeps/<name>/<config> --run-name <config> ...`, with its console
output in `sweeps/<name>/logs/<config>.log`. Running the same command again resumes the sweep: a
configuration whose summary.json says completed / early_stopped / max_steps is not trained again;
an interrupted one continues from its latest checkpoint (`--resume-from latest`) or starts over.

Then `sweeps/<name>/summary.md` and `summary.csv` list, per configuration, the final and best
validation loss, best perplexity and epoch, training time, peak memory and tokens/s (from
summary.json and eval_log.jsonl only), mark the best one, and say when the configurations differ by
less than the validation noise (train.py's bootstrap `val_loss_ci95`): diminishing returns.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from common.data import DEFAULT_VALIDATION_SPLIT, DataError, hold_out_validation, load_records
from common.jsonio import read_json, read_jsonl, write_json

REPO = Path(__file__).resolve().parent
logger = logging.getLogger("sweep")
FINISHED = ("completed", "early_stopped", "max_steps")
RESERVED_FLAGS = ("output-dir", "run-name", "resume-from", "overwrite", "config", "subset", "validation-split-seed")
TRAIN_DEFAULT_SEED = 1234  # train.py's --seed default
COLUMNS = [
    "config",
    "status",
    "final_val_loss",
    "best_val_loss",
    "best_val_ppl",
    "best_epoch",
    "val_loss_ci95",
    "train_time_s",
    "peak_mem_mb",
    "tokens_per_s",
    "is_best",
    "run_dir",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the sweep's own flags; everything after `--` is kept in `args.train_args`.

    Args:
        argv: the arguments (default: sys.argv[1:]).

    Returns:
        The flags, with `grid` as [(key, [values])] and `train_args` the pass-through list.

    Raises:
        SystemExit: a malformed grid, or a flag after `--` that the sweep sets itself (exit code 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # --- the grid ---
    parser.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="train.py flags and values")
    parser.add_argument("--subset", type=int, help="train each configuration on the first N training examples")
    # --- where and how ---
    parser.add_argument("--name", help="sweep name (default: derived from the grid and the extra arguments)")
    parser.add_argument("--sweeps-dir", default="sweeps", help="parent folder of all sweeps")
    parser.add_argument("--train-script", default=str(REPO / "train.py"), help="the training script to run")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, train nothing")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild summary.md/.csv from the logs")
    args = parser.parse_args(argv)
    args.train_args = train_args
    args.train_script = str(Path(args.train_script).resolve())
    try:
        args.grid = parse_grid(args.grid)
    except ValueError as err:
        parser.error(str(err))
    passed = {a[2:].split("=")[0] for a in train_args if a.startswith("--")}
    clash = sorted(passed & ({key for key, _ in args.grid} | set(RESERVED_FLAGS)))
    if clash:
        parser.error(f"--{', --'.join(clash)} after '--' is set by the sweep itself; put it in --grid or drop it")
    if args.subset is not None and args.subset < 1:
        parser.error(f"--subset must be at least 1, got {args.subset}")
    if args.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '.', '_' and '-'")
    return args


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """Turn ["lr=1e-4,2e-4", "rank=8"] into [("lr", ["1e-4", "2e-4"]), ("rank", ["8"])].

    Args:
        items: the --grid values; keys are train.py flag names without dashes ("batch_size" works too).

    Returns:
        (flag name with dashes, values as strings) pairs, in command-line order.

    Raises:
        ValueError: an item is not key=v1,v2, a key repeats, is reserved, or a value is empty.
    """
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().lstrip("-").replace("_", "-")
        choices = [v.strip() for v in values.split(",")]
        if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key) or not all(choices):
            raise ValueError(f"--grid item {item!r} is not KEY=V1,V2 (e.g. lr=1e-4,2e-4)")
        if key in RESERVED_FLAGS or any(key == k for k, _ in grid):
            raise ValueError(f"--grid key {key!r} is reserved or repeated")
        grid.append((key, choices))
    return grid


def config_slug(config: dict[str, str]) -> str:
    """Folder name of one configuration: "lr=1e-4_rank=8" (unsafe characters become '-')."""
    return "_".join(f"{key}={re.sub(r'[^A-Za-z0-9.+=-]', '-', value)}" for key, value in config.items())


def default_name(grid: list[tuple[str, list[str]]], fixed: list[str]) -> str:
    """A stable sweep name for the same command, so re-running it resumes: "lr-rank-3f2a9c01"."""
    digest = hashlib.sha256(json.dumps([grid, fixed]).encode()).hexdigest()[:8]
    return "-".join(key for key, _ in grid) + f"-{digest}"


def is_finished(run_dir: Path) -> bool:
    """A configuration is done when its summary.json reports a finished status."""
    try:
        return read_json(run_dir / "summary.json").get("status") in FINISHED
    except (OSError, ValueError):
        return False


def flag_value(arguments: list[str], flag: str) -> str | None:
    """The value of `--flag V` or `--flag=V` in a train.py argument list (the last one wins), else None."""
    value = None
    for i, argument in enumerate(arguments):
        if argument == flag and i + 1 < len(arguments):
            value = arguments[i + 1]
        elif argument.startswith(f"{flag}="):
            value = argument.split("=", 1)[1]
    return value


def check_validation_split(train_args: list[str], grid: list[tuple[str, list[str]]]) -> int | None:
    """train.py's rule for a user's own --train-file given without --validation-file, checked once for the sweep.

    train.py then holds out a seeded share of the file for validation. Every configuration must
    validate on the same examples, even when the grid sweeps --seed, so the sweep fixes the split
    seed (the fixed --seed, else train.py's default) and checks here, before anything trains, that
    the file is large enough to split.

    Args:
        train_args: the arguments given after `--`.
        grid: from `parse_grid`.

    Returns:
        The split seed to pass as --validation-split-seed, or None when the rule does not apply.

    Raises:
        SystemExit: the file cannot be read or is too small to split (the message names it).
    """
    train_file = flag_value(train_args, "--train-file")
    keys = {key for key, _ in grid}
    if train_file is None or flag_value(train_args, "--validation-file") or keys & {"train-file", "validation-file"}:
        return None
    if Path(train_file).resolve() == (REPO / "data" / "train.jsonl").resolve():
        return None  # the demo's data keeps its validation file
    seed = int(flag_value(train_args, "--seed") or TRAIN_DEFAULT_SEED)
    fractions = dict(grid).get("validation-split") or [flag_value(train_args, "--validation-split")]
    try:
        records = load_records(train_file)
        for fraction in fractions:
            _, _, split = hold_out_validation(records, float(fraction or DEFAULT_VALIDATION_SPLIT), seed, train_file)
            held_out = f"{split['validation_examples']} of the {split['source_examples']} examples of {train_file}"
            logger.info("validation: every configuration holds out the same %s (seed %d)", held_out, seed)
    except (DataError, ValueError) as err:
        sys.exit(f"sweep.py: error: {err}")
    return seed


def pin_precision(train_args: list[str], grid: list[tuple[str, list[str]]], recorded: str | None) -> str | None:
    """One mixed precision for every configuration of the sweep, measured once.

    train.py's `--mixed-precision auto` times the dtypes on a CPU at each start; two dtypes within the
    measurement noise could then differ between configurations, and a sweep would compare dtypes
    instead of its grid. So the sweep resolves it once (common/precision.py), records it in
    sweep.json, and a resumed sweep reuses the recorded one.

    Args:
        train_args: the arguments given after `--`.
        grid: from `parse_grid`.
        recorded: the precision sweeps/<name>/sweep.json holds from an earlier start, if any.

    Returns:
        "no", "bf16" or "fp16" to pass as --mixed-precision, or None when the user sets it (or sweeps
        --model, where each model gets its own).
    """
    keys = {key for key, _ in grid}
    if flag_value(train_args, "--mixed-precision") or keys & {"mixed-precision", "model"}:
        return None
    if recorded:
        return recorded
    import torch

    from common.model import DEFAULT_MODEL, ModelLoadError, load_config
    from common.precision import resolve_precision

    try:
        config = load_config(flag_value(train_args, "--model") or DEFAULT_MODEL)
    except ModelLoadError as err:
        sys.exit(f"sweep.py: error: {err}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    choice = resolve_precision("auto", device, config, measure_peak=False)
    logger.info("precision: every configuration trains with --mixed-precision %s (%s)", choice.precision, choice.reason)
    return choice.precision


def build_command(
    train_script: str,
    run_dir: Path,
    slug: str,
    config: dict,
    subset: int | None,
    extra: list[str],
    split_seed: int | None = None,
):
    """The train.py command for one configuration; an interrupted run resumes or restarts.

    Args:
        train_script: path of train.py.
        run_dir: the configuration's run folder (train.py --output-dir).
        slug: the configuration's name (train.py --run-name).
        config: {flag: value} of this grid point.
        subset: train on the first N examples, or None for all.
        extra: the arguments given after `--`, appended unchanged.
        split_seed: --validation-split-seed, the same for every configuration (`check_validation_split`).

    Returns:
        The argv list, starting with this interpreter.
    """
    command = [sys.executable, train_script, "--output-dir", str(run_dir), "--run-name", slug]
    for key, value in config.items():
        command += [f"--{key}", value]
    if subset:
        command += ["--subset", str(subset)]
    if split_seed is not None:
        command += ["--validation-split-seed", str(split_seed)]
    if any((run_dir / "checkpoints").glob("step_*/COMPLETE")):
        command += ["--resume-from", "latest"]
    elif (run_dir / "config.json").exists():
        command += ["--overwrite"]  # started but no complete checkpoint: nothing to resume
    return command + extra


def collect_result(run_dir: Path, slug: str) -> dict:
    """One summary row from a run folder's summary.json and eval_log.jsonl.

    Args:
        run_dir: the configuration's run folder.
        slug: the configuration's name.

    Returns:
        A dict with the `COLUMNS` keys (None where the logs have no value).
    """
    row = dict.fromkeys(COLUMNS)
    row.update(config=slug, run_dir=str(run_dir), is_best=False)
    summary_file = run_dir / "summary.json"
    summary = read_json(summary_file, missing_ok=True) or {}
    row["status"] = summary.get("status", "not finished")
    evals = [e for e in read_jsonl(run_dir / "eval_log.jsonl", skip_torn_last_line=True) if not e.get("baseline")]
    evals = [e for e in evals if isinstance(e.get("val_loss"), float | int) and math.isfinite(e["val_loss"])]
    if evals:
        best = min(evals, key=lambda e: e["val_loss"])
        row.update(final_val_loss=evals[-1]["val_loss"], best_val_loss=best["val_loss"])
        row.update(best_val_ppl=best["val_ppl"], best_epoch=best.get("epoch"), val_loss_ci95=best.get("val_loss_ci95"))
    for key in ("best_val_ppl", "best_epoch", "train_time_s", "peak_mem_mb", "tokens_per_s"):
        if summary.get(key) is not None:
            row[key] = summary[key]
    return row


def noise_note(rows: list[dict]) -> str:
    """Say whether the configurations differ by more than the best one's validation noise.

    Args:
        rows: from `collect_result`; the noise is the best row's `val_loss_ci95` (bootstrap half-width).

    Returns:
        One sentence for summary.md.
    """
    done = [r for r in rows if r["status"] in FINISHED and r["best_val_loss"] is not None]
    if len(done) < 2:
        return "Fewer than two finished configurations: nothing to compare yet."
    best = min(done, key=lambda r: r["best_val_loss"])
    spread = max(r["best_val_loss"] for r in done) - best["best_val_loss"]
    if best["val_loss_ci95"] is None:
        return f"Spread of best validation loss: {spread:.4f}; validation noise unknown (no val_loss_ci95 logged)."
    noise = best["val_loss_ci95"]
    close = [r["config"] for r in done if r is not best and r["best_val_loss"] - best["best_val_loss"] <= noise]
    if spread <= noise:
        return (
            f"Diminishing returns: the spread of best validation loss ({spread:.4f}) is within the validation noise "
            f"(bootstrap 95% half-width ±{noise:.4f}); the grid does not separate these configurations, "
            "so prefer the cheapest one."
        )
    if close:
        return (
            f"Within the validation noise (±{noise:.4f}) of the best: {', '.join(close)}; "
            f"the rest are worse by more than the noise (spread {spread:.4f})."
        )
    return f"The best configuration beats every other one by more than the validation noise (±{noise:.4f})."


def fmt(value, digits: int = 4) -> str:
    """Format one table cell."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_sweep_summary(sweep_dir: Path, rows: list[dict], grid_keys: list[str]) -> None:
    """Write summary.csv and summary.md (best configuration marked, noise note).

    Args:
        sweep_dir: sweeps/<name>.
        rows: from `collect_result`, with `is_best` set.
        grid_keys: the swept flags, named in the heading.
    """
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = ["config", "status", "final val loss", "best val ppl", "best epoch", "train time (s)", "peak mem (MB)"]
    header += ["tokens/s", "best"]
    lines = [f"# Sweep {sweep_dir.name}", "", f"Grid over: {', '.join(grid_keys)}. Lower validation loss is better."]
    lines += ["", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in rows:
        cells = [r["config"], r["status"], fmt(r["final_val_loss"]), fmt(r["best_val_ppl"]), fmt(r["best_epoch"])]
        cells += [fmt(r["train_time_s"], 3), fmt(r["peak_mem_mb"], 4), fmt(r["tokens_per_s"], 4)]
        cells.append("**best**" if r["is_best"] else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", noise_note(rows), ""]
    (sweep_dir / "summary.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> list[dict]:
    """Run (or resume) the sweep and write its summary.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        The summary rows (one per configuration, as in summary.csv); [] with --dry-run.

    Raises:
        SystemExit: bad arguments, a sweep name reused with other fixed arguments, or failed
            configurations (after the summary is written).
    """
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name = args.name or default_name(args.grid, [*args.train_args, f"subset={args.subset}"])
    sweep_dir = Path(args.sweeps_dir) / name
    keys = [key for key, _ in args.grid]
    configs = [dict(zip(keys, values)) for values in itertools.product(*(v for _, v in args.grid))]
    split_seed = None if args.summary_only else check_validation_split(args.train_args, args.grid)
    if args.dry_run:
        for i, config in enumerate(configs, start=1):
            slug = config_slug(config)
            command = build_command(
                args.train_script, sweep_dir / slug, slug, config, args.subset, args.train_args, split_seed
            )
            status = "finished, not rerun" if is_finished(sweep_dir / slug) else " ".join(command)
            logger.info("[%d/%d] %s: %s", i, len(configs), slug, status)
        return []

    # Re-using a sweep name with other fixed arguments would mix incomparable runs in one table.
    fixed = {"train_args": args.train_args, "subset": args.subset, "train_script": args.train_script}
    record_file = sweep_dir / "sweep.json"
    if record_file.is_file() and json.loads(record_file.read_text()).get("fixed") != fixed:
        previous = json.loads(record_file.read_text())["fixed"]
        sys.exit(f"sweep.py: error: sweep '{name}' was run with {previous}, not {fixed}; use another --name")
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    recorded = json.loads(record_file.read_text()).get("mixed_precision") if record_file.is_file() else None
    precision = recorded if args.summary_only else pin_precision(args.train_args, args.grid, recorded)
    record = {"name": name, "grid": args.grid, "fixed": fixed, "mixed_precision": precision}
    write_json(record_file, record)

    failed = []
    for i, config in enumerate([] if args.summary_only else configs, start=1):
        slug = config_slug(config)
        run_dir = sweep_dir / slug
        prefix = f"[{i}/{len(configs)}] {slug}"
        if is_finished(run_dir):
            logger.info("%s: finished earlier, not rerun", prefix)
            continue
        command = build_command(args.train_script, run_dir, slug, config, args.subset, args.train_args, split_seed)
        if precision:  # right after --run-name: the arguments after `--` stay last
            at = command.index("--run-name") + 2
            command[at:at] = ["--mixed-precision", precision]
        log_file = sweep_dir / "logs" / f"{slug}.log"
        logger.info("%s: training (log: %s)", prefix, log_file)
        start = time.perf_counter()
        with open(log_file, "a") as log:
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        if returncode != 0 or not is_finished(run_dir):
            failed.append(slug)
            logger.info("%s: FAILED (exit %d); see %s", prefix, returncode, log_file)
        else:
            logger.info("%s: done in %.0f s", prefix, time.perf_counter() - start)

    rows = [collect_result(sweep_dir / config_slug(config), config_slug(config)) for config in configs]
    finished = [r for r in rows if r["status"] in FINISHED and r["best_val_loss"] is not None]
    if finished:
        min(finished, key=lambda r: r["best_val_loss"])["is_best"] = True
    write_sweep_summary(sweep_dir, rows, keys)
    logger.info("summary: %s", sweep_dir / "summary.md")
    if failed:
        sys.exit(f"sweep.py: error: {len(failed)} configuration(s) failed: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()
