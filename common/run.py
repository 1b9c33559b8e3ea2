"""Run-folder plumbing for train.py: lock, pre-flight write test, provenance, logging, checkpoints.

Everything written here is safetensors (tensors) or JSON (the rest); nothing is pickled, so nothing
is ever read back with `torch.load`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
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

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")


class RunFolderError(RuntimeError):
    """The output folder cannot be used; the message says why and what to do."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def redact_secrets(value: object) -> object:
    """Replace secret values (tokens, keys, passwords, and the values of secret env vars) by "***".

    Args:
        value: any JSON-like structure.

    Returns:
        A copy with secrets redacted: keys containing token/key/secret/password, and any string
        equal to or containing the value of HF_TOKEN / WANDB_API_KEY from the environment.
    """
    secrets = [os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            lowered = str(key).lower()
            if any(word in lowered for word in ("token", "api_key", "apikey", "secret", "password")) and item:
                out[key] = "***" if not isinstance(item, (int, float, bool)) else item
            else:
                out[key] = redact_secrets(item)
        return out
    if isinstance(value, (list, tuple)):
        return [redact_secrets(item) for item in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
    return value


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
        f"no complete checkpoint under {output_dir / 'checkpoints'}; start a new run without --resume-from"
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
    return json.loads((folder / "trainer_state.json").read_text())


def rotate_checkpoints(checkpoint_dir: Path, keep: int, protect: set) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, never the newest nor any in `protect`."""
    if keep <= 0:
        return
    checkpoints = list_checkpoints(checkpoint_dir)
    removable = [p for p in checkpoints[:-1] if p.resolve() not in protect]
    while len(checkpoints) > keep and removable:
        victim = removable.pop(0)
        checkpoints.remove(victim)
        shutil.rmtree(victim)
