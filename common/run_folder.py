"""train.py's run folder (docs/run_folder.md): lock, write test, config, logs, summary; checkpoints: checkpoint.py."""

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.data import dataset_sha256
from common.jsonio import read_jsonl, write_json
from common.perf import peak_memory_mb


class RunFolderError(RuntimeError):
    """The output folder cannot be used; the message says why and what to do."""


# Locks this process holds, by lock file: a run that crashed inside this process (a test calling
# train.main, a notebook) never released its lock; the next run here takes it over.
_HELD_LOCKS: dict[str, int] = {}


def package_versions() -> dict:
    """Versions of the packages that decide what a run computes (None: not installed)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "accelerate", "bitsandbytes"):
        versions[name] = None
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)  # not imported: bitsandbytes prints warnings on CPU
    return versions


def acquire_lock(output_dir: Path) -> tuple[Path, int]:
    """Take `output_dir/.lock` (an exclusive `fcntl.flock`; the file holds the owner's pid) and return (lock file,
    descriptor) for `release_lock`; RunFolderError if another live process holds it. Two runs started at once cannot
    both get it, and the kernel drops it when its process dies (kill -9 too), so a stale file never blocks a resume."""
    path = output_dir / ".lock"
    leaked = _HELD_LOCKS.pop(str(path.resolve()), None)
    if leaked is not None:  # an earlier run in this process ended without release_lock (it crashed)
        os.close(leaked)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = (os.read(fd, 200).decode(errors="replace").split() or ["unknown"])[0]
            os.close(fd)
            raise RunFolderError(
                f"{output_dir} is in use by process {pid} (lock {path}); wait for it or use another --output-dir"
            ) from None
        # The previous owner may have unlinked the file between our open and our flock: then we hold
        # a lock on a deleted file, and the next run would create a new one. Retry on the new file.
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {platform.node()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
    _HELD_LOCKS[str(path.resolve())] = fd
    return path, fd


def release_lock(lock: tuple[Path, int] | None) -> None:
    """Remove the lock file and release the lock `acquire_lock` returned (None: nothing held, e.g. on other ranks)."""
    if lock is None or _HELD_LOCKS.get(str(lock[0].resolve())) != lock[1]:
        return  # nothing held, already released, or taken over by a later run of this process
    path, fd = lock
    del _HELD_LOCKS[str(path.resolve())]
    path.unlink(missing_ok=True)  # while still holding the lock: a waiting run then creates a fresh file
    os.close(fd)


def preflight_write(output_dir: Path, reserve_mb: float) -> None:
    """Create `output_dir` and prove it writable with `reserve_mb` free before training, else RunFolderError."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-") as handle:
            handle.write(b"0" * 65536)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise RunFolderError(f"cannot write to {output_dir} ({err.strerror}); choose a writable --output-dir") from None
    free_mb = shutil.disk_usage(output_dir).free / 2**20
    if free_mb < reserve_mb:
        raise RunFolderError(
            f"only {free_mb:.0f} MiB free in {output_dir}, the run needs about {reserve_mb:.0f} MiB for checkpoints; "
            "free space, lower --save-total-limit, or choose another --output-dir"
        )


def setup_logging(log_file: Path | None, is_main: bool) -> logging.Logger:
    """Logger writing one line per event to the console and `log_file` (main process only)."""
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    files = [logging.FileHandler(log_file)] if log_file is not None and is_main else []
    for handler in [logging.StreamHandler(sys.stdout), *files]:
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    return logger


def check_resume_flags(output_dir: Path, resume_from: str | None, overwrite: bool) -> None:
    """RunFolderError naming the fix: a new run into a folder holding one (no --overwrite), a missing --resume-from."""
    if resume_from is None and (output_dir / "config.json").exists() and not overwrite:
        raise RunFolderError(
            f"{output_dir} already holds a run; pass --resume-from latest to continue it, "
            "--overwrite to start it again, or another --output-dir"
        )
    if resume_from is not None and resume_from != "latest" and not Path(resume_from).is_dir():
        raise RunFolderError(
            f"--resume-from {resume_from}: no such checkpoint folder; use 'latest' or a step_XXXXXX folder"
        )


def clear_run_logs(output_dir: Path) -> None:
    """--overwrite: remove the old run's logs and summary (checkpoints, best/ and final/ are replaced as written)."""
    for name in ("train_log.jsonl", "eval_log.jsonl", "grad_log.jsonl", "summary.json", "train.log"):
        (output_dir / name).unlink(missing_ok=True)
    (output_dir / "update_ratios.json").unlink(missing_ok=True)
    for folder in ("checkpoints", "samples"):
        shutil.rmtree(output_dir / folder, ignore_errors=True)


def build_run_config(args: argparse.Namespace, derived: dict, model, repo: Path) -> dict:
    """The resolved configuration written to config.json before the first step (docs/run_folder.md)."""
    git = {"cwd": repo, "capture_output": True, "text": True, "timeout": 10}
    try:  # the commit of `repo`, "-dirty" if it has local changes
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    lora = model.peft_config["default"].to_dict()
    lora = json.loads(json.dumps(lora, default=lambda v: sorted(v) if isinstance(v, set | frozenset) else str(v)))
    return {
        "args": vars(args) | {"adam_betas": list(args.adam_betas)},
        "derived": derived,
        "lora": lora,
        "versions": package_versions(),
        "git_commit": commit,
        "dataset": {
            "train_file": args.train_file,
            "train_sha256": dataset_sha256(args.train_file),  # a file, or a save_to_disk folder
            "validation_file": args.validation_file,
            "validation_sha256": dataset_sha256(args.validation_file) if args.validation_file else None,
        },
        "seed": args.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def check_ranks_in_sync(parameters: list, accelerator) -> bool:
    """Whether every rank holds the same trainable weights (a float64 sum and sum-of-squares fingerprint)."""
    sums = [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in parameters]
    gathered = accelerator.gather(torch.cat(sums).unsqueeze(0))
    return bool((gathered == gathered[0]).all())


def write_run_summary(
    output_dir: Path, status: str, stop_reason: str, state: dict, params: dict, accelerator, ranks_in_sync: bool = True
) -> dict:
    """Summarize the run from its logs into summary.json (main process writes; every rank returns it)."""
    steps = [s for s in read_jsonl(output_dir / "train_log.jsonl") if s.get("type") == "step" and not s["skipped"]]
    seconds = sum(s["tokens"] / s["tokens_per_s"] for s in steps if s["tokens_per_s"] > 0)
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
        "tokens_per_s": sum(s["tokens"] for s in steps) / seconds if seconds else None,
        "mfu": sum(s["mfu"] for s in steps) / len(steps) if steps else None,
        "peak_mem_mb": peak_memory_mb(accelerator.device),
        "trainable_pct": params["trainable_pct"],
        "num_processes": accelerator.num_processes,
        "ranks_in_sync": ranks_in_sync,
    }
    if accelerator.is_main_process:
        write_json(output_dir / "summary.json", summary)
    return summary
