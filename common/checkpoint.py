"""Checkpoints and adapter folders (layout: docs/run_folder.md): save/load/find/rotate, atomic publish; no pickle.

Every folder (checkpoints/step_000120/, best/, final/) is written under a temporary name, renamed into place,
and gets its COMPLETE marker ({"created", "sha256": {file: digest}}) last; a folder without it is never used.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from common import fsdp
from common.jsonio import read_json, write_json

COMPLETE_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def assert_finite(tensors: dict, where: str) -> None:
    """Raise CheckpointError naming the first tensor with NaN/inf: such weights are never saved or exported."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor {name} has non-finite values; refusing to save or export it")


def write_optimizer_state(state_dict: dict, folder: Path) -> None:
    """An optimizer state_dict as optimizer.safetensors (its tensors) + optimizer.json (the rest, tensors by key)."""
    tensors, state = {}, {}
    for index, entry in state_dict["state"].items():
        state[str(index)] = {k: {"tensor": f"{index}.{k}"} if torch.is_tensor(v) else v for k, v in entry.items()}
        tensors |= {f"{index}.{k}": v.detach().contiguous().cpu() for k, v in entry.items() if torch.is_tensor(v)}
    save_file(tensors, str(folder / "optimizer.safetensors"))
    write_json(folder / "optimizer.json", {"param_groups": state_dict["param_groups"], "state": state})


def read_optimizer_state(folder: Path) -> dict:
    """Inverse of `write_optimizer_state`."""
    tensors, meta = load_file(folder / "optimizer.safetensors"), read_json(folder / "optimizer.json")
    state = {
        int(index): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v for k, v in entry.items()}
        for index, entry in meta["state"].items()
    }
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    """Every RNG this process uses, as JSON data: {"python", "numpy", "torch", "cuda"}."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, tuple of ints, gauss): a list of the same in JSON
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Restore RNGs captured by `rng_state` (possibly after a JSON round trip)."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def publish_folder(tmp_dir: Path, final_dir: Path, overwrite: bool = True, complete_marker: bool = True) -> None:
    """Rename a finished sibling temp folder into place, then write its COMPLETE marker (hashes) last.
    FileExistsError if `final_dir` exists (or appears meanwhile) and not `overwrite`."""
    # hash before the rename: the marker then vouches for exactly the bytes that were written
    digests = {p.name: sha256_of(p) for p in sorted(tmp_dir.glob("*.safetensors"))}
    old = final_dir.with_name(f".{final_dir.name}.old")
    if final_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{final_dir} already exists")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    try:  # rename (not replace): fails if another process published the same folder meanwhile
        os.rename(tmp_dir, final_dir)
    except OSError:
        if old.exists() and not final_dir.exists():
            os.replace(old, final_dir)
        raise FileExistsError(f"{final_dir} appeared while writing; not overwritten") from None
    if complete_marker:
        write_json(final_dir / COMPLETE_MARKER, {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": digests})
    shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> None:
    """Raise CheckpointError (naming the file) unless the folder has COMPLETE, matching hashes and readable tensors."""
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path} has no COMPLETE marker: it was not fully written; use another checkpoint")
    try:  # COMPLETE holds {"sha256": {file: digest}}; older checkpoints hold only a timestamp
        expected = json.loads((path / COMPLETE_MARKER).read_text()).get("sha256", {})
    except (json.JSONDecodeError, AttributeError):
        expected = {}
    for name, digest in sorted(expected.items()):
        if not (path / name).is_file() or sha256_of(path / name) != digest:
            raise CheckpointError(
                f"{path / name} is corrupted (sha256 differs from the one recorded in COMPLETE); use an earlier checkpoint"
            )
    for file in sorted(path.glob("*.safetensors")):
        try:
            load_file(file)
        except Exception as err:  # safetensors raises several types for truncated/corrupted files
            raise CheckpointError(
                f"{file} is corrupted ({type(err).__name__}: {err}); use an earlier checkpoint"
            ) from None


def list_complete(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (with the COMPLETE marker) under `checkpoint_dir`, oldest first."""
    found = [p for p in Path(checkpoint_dir).glob("step_*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_adapter_folder(
    model, tokenizer, folder: Path, base_model: str, extra_json: dict, state_dict: dict | None = None
) -> None:
    """Write a PEFT adapter folder atomically (tokenizer and `extra_json` {name: data} beside it); CheckpointError
    if a weight is NaN/inf. `base_model`: the --model recorded in adapter_config.json; `state_dict`: the full
    adapter of a sharded model (`common.fsdp.gather_sharded_adapter`), None when the model holds it whole."""
    from peft import get_peft_model_state_dict

    assert_finite(get_peft_model_state_dict(model, state_dict=state_dict), str(folder))
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.peft_config["default"].base_model_name_or_path = base_model
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    for name, data in extra_json.items():
        write_json(tmp / name, data)
    publish_folder(tmp, folder)


def save(accelerator, model, optimizer, lr_scheduler, trainer_state: dict, folder: Path, config: dict) -> None:
    """Save everything an exact resume needs into `folder`; every rank calls it (each saves its RNG)."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write_json(tmp / f"rng_state_rank{accelerator.process_index}.json", rng_state())
    # FSDP: every rank gathers the sharded adapter and AdamW moments whole; rank 0 writes a one-process run's files
    adapter = fsdp.gather_sharded_adapter(model)
    optimizer_state = optimizer.state_dict() if adapter is None else fsdp.gather_optimizer_state(optimizer.state_dict())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.peft_config["default"].base_model_name_or_path = config["args"]["model"]
        model.save_pretrained(tmp, safe_serialization=True, state_dict=adapter)
        write_optimizer_state(optimizer_state, tmp)
        write_json(tmp / "scheduler.json", lr_scheduler.state_dict())
        write_json(tmp / "scaler.json", accelerator.scaler.state_dict() if accelerator.scaler is not None else None)
        write_json(tmp / "trainer_state.json", trainer_state)
        write_json(tmp / "config.json", config)
        publish_folder(tmp, folder)
    accelerator.wait_for_everyone()


def find_resume(output_dir: Path, resume_from: str, logger: logging.Logger) -> Path:
    """The checkpoint to resume from ("latest": the newest complete one that verifies); CheckpointError if none."""
    if resume_from != "latest":
        verify(Path(resume_from))
        return Path(resume_from)
    for path in reversed(list_complete(output_dir / "checkpoints")):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            logger.warning(f"skipping checkpoint: {err}")
    raise CheckpointError(
        f"no complete checkpoint under {output_dir / 'checkpoints'}: nothing to resume; run without --resume-from "
        "(add --overwrite if the folder already holds a run's files)"
    )


def load(accelerator, model, optimizer, lr_scheduler, folder: Path) -> dict:
    """Restore adapter weights, optimizer, scheduler, scaler and this rank's RNG; return trainer_state.json.
    CheckpointError if the weights do not fit this model or the checkpoint was saved by fewer ranks."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = load_file(folder / "adapter_model.safetensors")
    optimizer_state = read_optimizer_state(folder)
    if fsdp.is_sharded(model):  # FSDP: every rank keeps its own slice of the full tensors saved
        sharded = get_peft_model_state_dict(model)  # {file key: DTensor}, no communication
        adapter = {key: fsdp.shard_like(v, sharded[key]) if key in sharded else v for key, v in adapter.items()}
        optimizer_state = fsdp.shard_optimizer_state(optimizer_state, optimizer)
    if unexpected := getattr(set_peft_model_state_dict(model, adapter), "unexpected_keys", []):
        raise CheckpointError(f"{folder}: adapter weights do not match this model ({unexpected[:3]})")
    optimizer.load_state_dict(optimizer_state)
    lr_scheduler.load_state_dict(read_json(folder / "scheduler.json"))
    if (scaler_state := read_json(folder / "scaler.json")) and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(scaler_state)
    rng_file = folder / f"rng_state_rank{accelerator.process_index}.json"
    if not rng_file.exists():
        raise CheckpointError(
            f"{rng_file} missing: the checkpoint was saved with fewer processes; resume with the same number"
        )
    restore_rng_state(read_json(rng_file))
    return read_json(folder / "trainer_state.json")


def rotate(checkpoint_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (0 keeps all); incomplete ones stay for inspection."""
    for victim in list_complete(checkpoint_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(victim)
