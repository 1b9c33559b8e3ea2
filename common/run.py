"""Run-folder plumbing for train.py: lock, pre-flight write test, provenance, logging, checkpoints.

Everything written here is safetensors (tensors) or JSON (the rest); nothing is pickled, so nothing
is ever read back with `torch.load`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.data import dataset_sha256
from common.seed import get_rng_state, set_rng_state
from common.training import (
    CheckpointError,
    assert_finite,
    check_checkpoint,
    list_checkpoints,
    optimizer_state_from_files,
    optimizer_state_to_files,
    publish_folder,
    save_file_atomic,
    write_json,
)


class RunFolderError(RuntimeError):
    """The output folder cannot be used; the message says why and what to do."""


def git_commit(repo: Path) -> str:
    """The current git commit of `repo` (with "-dirty" if it has local changes), or "unknown"."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict:
    """Versions of the packages that decide what a run computes."""
    import accelerate
    import peft
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    try:  # metadata only: importing bitsandbytes prints kernel warnings on CPU
        versions["bitsandbytes"] = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        versions["bitsandbytes"] = None
    return versions


def pid_alive(pid: int) -> bool:
    """True if a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(output_dir: Path) -> Path:
    """Create `output_dir/.lock` holding our pid; refuse if a live process holds it.

    Raises:
        RunFolderError: another live process is training into this folder.
    """
    lock = output_dir / ".lock"
    if lock.exists():
        try:
            pid = int(lock.read_text().split()[0])
        except (ValueError, IndexError):
            pid = -1
        if pid > 0 and pid != os.getpid() and pid_alive(pid):
            raise RunFolderError(
                f"{output_dir} is in use by process {pid} (lock {lock}); wait for it or use another --output-dir"
            )
    lock.write_text(f"{os.getpid()} {platform.node()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    return lock


def release_lock(lock: Path | None) -> None:
    """Remove the lock file if it is ours."""
    if lock is not None and lock.exists():
        try:
            if int(lock.read_text().split()[0]) == os.getpid():
                lock.unlink()
        except (OSError, ValueError, IndexError):
            pass


def preflight_write(output_dir: Path, reserve_mb: float) -> None:
    """Prove the output folder is writable and has room before any training happens.

    Args:
        output_dir: the run folder (created if needed).
        reserve_mb: disk space the run will need (checkpoints, logs), checked against free space.

    Raises:
        RunFolderError: the folder cannot be created or written, or the disk is too full.
    """
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
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    logger.addHandler(console)
    if log_file is not None and is_main:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON object as a line (flushed, so a kill loses at most the line being written)."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated on GPU, process peak RSS (VmHWM) on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_utilization(device: torch.device) -> float | None:
    """GPU utilization in percent (needs pynvml), or None on CPU / when unavailable."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # pynvml missing or unsupported
        return None


def save_adapter_folder(model, tokenizer, folder: Path, base_model: str, extra_json: dict) -> None:
    """Write a PEFT adapter folder (safetensors) atomically, refusing non-finite weights.

    Args:
        model: the unwrapped PEFT model.
        tokenizer: saved next to the adapter (chat template included), or None.
        folder: destination, e.g. runs/<run>/best.
        base_model: what the user passed as --model, recorded in adapter_config.json.
        extra_json: {"file name": data} to write as JSON inside the folder.

    Raises:
        CheckpointError: an adapter weight is NaN/inf.
    """
    from peft import get_peft_model_state_dict

    assert_finite(get_peft_model_state_dict(model), str(folder))
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.peft_config["default"].base_model_name_or_path = base_model
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, data in extra_json.items():
        write_json(tmp / name, data)
    publish_folder(tmp, folder)


def save_checkpoint(
    accelerator, model, optimizer, lr_scheduler, trainer_state: dict, folder: Path, config: dict
) -> None:
    """Save everything needed to resume exactly; call on every rank (each rank saves its RNG).

    Args:
        accelerator: the run's Accelerator.
        model: the unwrapped PEFT model (only adapter weights are saved).
        optimizer, lr_scheduler: their states are saved as safetensors + JSON.
        trainer_state: step counters, data position, best metric, early-stopping state.
        folder: e.g. runs/<run>/checkpoints/step_000120.
        config: the run's resolved config, copied into the checkpoint.

    Layout: adapter (safetensors), optimizer.safetensors + optimizer.json, scheduler.json,
    scaler.json, rng_state_rank<N>.json, trainer_state.json, config.json, and COMPLETE last.
    """
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_json(tmp / f"rng_state_rank{accelerator.process_index}.json", get_rng_state())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.peft_config["default"].base_model_name_or_path = config["args"]["model"]
        model.save_pretrained(tmp, safe_serialization=True)
        tensors, meta = optimizer_state_to_files(optimizer.state_dict())
        save_file_atomic(tensors, tmp / "optimizer.safetensors")
        write_json(tmp / "optimizer.json", meta)
        write_json(tmp / "scheduler.json", lr_scheduler.state_dict())
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        write_json(tmp / "scaler.json", scaler)
        write_json(tmp / "trainer_state.json", trainer_state)
        write_json(tmp / "config.json", config)
        publish_folder(tmp, folder)
    accelerator.wait_for_everyone()


def find_resume_checkpoint(output_dir: Path, resume_from: str, logger: logging.Logger) -> Path:
    """Pick the checkpoint to resume from: "latest" = newest complete and readable one.

    A folder without COMPLETE is never picked; a complete one whose safetensors are corrupted is
    reported and skipped in favour of the previous complete checkpoint.

    Raises:
        CheckpointError: no usable checkpoint.
    """
    if resume_from != "latest":
        path = Path(resume_from)
        check_checkpoint(path)
        return path
    candidates = list_checkpoints(output_dir / "checkpoints")
    for path in reversed(candidates):
        try:
            check_checkpoint(path)
            return path
        except CheckpointError as err:
            logger.warning(f"skipping checkpoint: {err}")
    raise CheckpointError(
        f"no complete checkpoint under {output_dir / 'checkpoints'}: nothing to resume; run without --resume-from "
        "(add --overwrite if the folder already holds a run's files)"
    )


def load_checkpoint(accelerator, model, optimizer, lr_scheduler, folder: Path) -> dict:
    """Restore adapter weights, optimizer, scheduler, scaler and this rank's RNG from `folder`.

    Args:
        accelerator: the run's Accelerator.
        model: the unwrapped PEFT model.
        optimizer, lr_scheduler: restored in place.
        folder: a complete checkpoint folder.

    Returns:
        The trainer state dict saved with the checkpoint.
    """
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise CheckpointError(f"{folder}: adapter weights do not match this model ({unexpected[:3]})")
    meta = json.loads((folder / "optimizer.json").read_text())
    optimizer.load_state_dict(optimizer_state_from_files(load_file(folder / "optimizer.safetensors"), meta))
    lr_scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    scaler_state = json.loads((folder / "scaler.json").read_text())
    if scaler_state and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    rng_file = folder / f"rng_state_rank{accelerator.process_index}.json"
    if not rng_file.exists():
        raise CheckpointError(
            f"{rng_file} missing: the checkpoint was saved with fewer processes; resume with the same number"
        )
    set_rng_state(json.loads(rng_file.read_text()))
    # defaults first: a checkpoint written before a counter existed still resumes
    return new_trainer_state() | json.loads((folder / "trainer_state.json").read_text())


def rotate_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (0 keeps all); the newest always stays.

    best/ and final/ are separate folders, so rotation can never delete them. Incomplete folders
    (a crash mid-save) are left for inspection; they are never used for resuming.
    """
    if keep <= 0:
        return
    for victim in list_checkpoints(checkpoint_dir)[: -max(keep, 1)]:
        shutil.rmtree(victim)


# --- argument helpers for train.py ---


def load_config_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """Read flag defaults from a YAML/JSON file; a run's config.json contributes its "args" section.

    Per-run flags (output folder, run name, resume, overwrite) are never taken from the file.

    Raises:
        SystemExit: unreadable file or an unknown key, naming the file and the key.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        sys.exit(f"error: --config {path}: cannot read it ({err})")
    data = data.get("args", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        sys.exit(f"error: --config {path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = key.replace("-", "_")
        if dest not in known:
            sys.exit(f"error: --config {path}: unknown key '{key}'; see --help for the flags")
        if dest not in ("config", "resume_from", "output_dir", "run_name", "overwrite"):
            defaults[dest] = value
    return defaults


def parse_fault_injection(spec: str) -> dict[str, set[int]]:
    """Parse the test-only `--fault-inject` flag: "loss:3,grad:5,stop:11" -> {"loss": {3}, "grad": {5}, "stop": {11}}.

    loss:N / grad:N make optimizer step N's loss NaN / gradients inf; stop:N exits abruptly right
    after micro-batch N (nothing saved), as a crash would.

    Raises:
        SystemExit: on a malformed item.
    """
    faults = {"loss": set(), "grad": set(), "stop": set()}
    for item in filter(None, spec.split(",")):
        kind, _, step = item.partition(":")
        if kind not in faults or not step.isdigit():
            sys.exit(f"error: --fault-inject item '{item}' must look like loss:3, grad:5 or stop:11")
        faults[kind].add(int(step))
    return faults


def check_resume_flags(output_dir: Path, resume_from: str | None, overwrite: bool) -> None:
    """Refuse to start a new run into a folder that already holds one (unless --overwrite).

    Raises:
        RunFolderError: with the flags that resolve it.
    """
    if resume_from is None and (output_dir / "config.json").exists() and not overwrite:
        raise RunFolderError(
            f"{output_dir} already holds a run; pass --resume-from latest to continue it, "
            "--overwrite to start it again, or another --output-dir"
        )
    if resume_from is not None and resume_from != "latest" and not Path(resume_from).is_dir():
        raise RunFolderError(
            f"--resume-from {resume_from}: no such checkpoint folder; use 'latest' or a step_XXXXXX folder"
        )


def check_splits(
    train_file: str,
    train_examples: list,
    validation_file: str,
    val_examples: list,
    max_seq_len: int,
    both_given: bool = True,
) -> None:
    """Refuse empty splits and, when the user gave both files, a validation file larger than the training file.

    Args:
        train_file: --train-file.
        train_examples: its tokenized examples.
        validation_file: --validation-file, or a description of the split held out of the training file.
        val_examples: the validation examples.
        max_seq_len: --max-seq-len, named in the messages.
        both_given: the user passed both --train-file and --validation-file; only then can a larger
            validation set mean swapped files (a default or a held-out split is never the user's mistake).

    Raises:
        DataError: naming the file and what to do.
    """
    from common.data import DataError

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


def check_memory(
    model_config,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    logger: logging.Logger,
    seq_len: int | None = None,
) -> str:
    """Memory pre-flight: warn (or with --strict-memory refuse) when the estimate does not fit the device.

    Args:
        model_config: the model's config (its attention implementation is read from it).
        args: train.py's flags.
        device: where training runs.
        dtype: the frozen base's and the compute dtype.
        logger: where the verdict goes.
        seq_len: the longest padded training row (default --max-seq-len); a batch is never longer.

    Returns:
        The verdict line (also logged); train.py records it in config.json.

    Raises:
        RunFolderError: with --strict-memory, when the configuration will not fit.
    """
    from common.lora import parse_target_modules
    from common.memory import check_fits

    fits, message = check_fits(
        model_config,
        device.type,
        args.batch_size,
        min(seq_len or args.max_seq_len, args.max_seq_len),
        args.rank,
        parse_target_modules(args.target_modules),
        args.quantization,
        dtype,
        args.gradient_checkpointing,
        compute_dtype=dtype,
        lora_dropout=args.dropout,
    )
    if fits:
        logger.info(message)
    elif args.strict_memory:
        raise RunFolderError(message)
    else:
        logger.warning(f"warning: {message}")
    return message


def clear_run_logs(output_dir: Path) -> None:
    """--overwrite: remove the previous run's logs and summary (checkpoints, best/ and final/ are replaced as written)."""
    for name in (
        "train_log.jsonl",
        "eval_log.jsonl",
        "grad_log.jsonl",
        "summary.json",
        "train.log",
        "update_ratios.json",
    ):
        (output_dir / name).unlink(missing_ok=True)
    for folder in ("checkpoints", "samples"):
        shutil.rmtree(output_dir / folder, ignore_errors=True)


def _jsonable(value: object) -> object:
    return sorted(value) if isinstance(value, set | frozenset) else str(value)


def build_run_config(args: argparse.Namespace, derived: dict, model, repo: Path) -> dict:
    """The resolved configuration written to config.json before the first step (docs/run_folder.md)."""
    return {
        "args": vars(args) | {"adam_betas": list(args.adam_betas)},
        "derived": derived,
        "lora": json.loads(json.dumps(model.peft_config["default"].to_dict(), default=_jsonable)),
        "versions": package_versions(),
        "git_commit": git_commit(repo),
        "dataset": {
            "train_file": args.train_file,
            "train_sha256": dataset_sha256(args.train_file),  # a file, or a save_to_disk folder
            "validation_file": args.validation_file,
            "validation_sha256": dataset_sha256(args.validation_file) if args.validation_file else None,
        },
        "seed": args.seed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def new_trainer_state() -> dict:
    """Counters and early-stopping state; saved in every checkpoint so a resume continues exactly."""
    return {
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
        "epoch_loss_sum": 0.0,
        "epoch_loss_steps": 0,
        "train_time_s": 0.0,
        "baseline_val_ppl": None,
    }


def check_ranks_in_sync(parameters: list, accelerator) -> bool:
    """True when every rank holds the same trainable weights (data parallel kept them in lockstep).

    Compares a float64 fingerprint (sum and sum of squares of every tensor) gathered from all ranks.
    """
    fingerprint = torch.stack(
        [torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in parameters]
    )
    gathered = accelerator.gather(fingerprint.flatten().unsqueeze(0))
    return bool((gathered == gathered[0]).all())


def write_summary(
    output_dir: Path, status: str, stop_reason: str, state: dict, params: dict, accelerator, ranks_in_sync: bool = True
) -> dict:
    """Summarize the run from its logs into summary.json (main process writes; every rank returns it)."""
    log = output_dir / "train_log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    steps = [s for s in steps if s.get("type") == "step" and not s["skipped"]]
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
