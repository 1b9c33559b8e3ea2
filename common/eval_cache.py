"""A cache of base-model evaluations (evaluate.py): the base scores the same every time, so run it once.

A base evaluation is a function of the base model's files, the data, the generation settings, the
precision, the package versions and the code that tokenizes, scores the loss and generates. The
cache key is the sha256 of all of these; the entry holds the raw outputs (per-example loss sums and
token counts, the replies), so the metrics are recomputed from them by the current scoring code.

    key, parts = cache_key({"model": model_digest(folder), "data": ..., "settings": ...})
    entry = load_entry(key)          # None: not cached (or unreadable)
    save_entry(key, parts, outputs)  # after computing

Entries live in `$UNDERWRITE_EVAL_CACHE` if set, else beside the converted models
(`~/.cache/underwrite-lora/base-eval/` by default); delete the folder (or pass evaluate.py
`--no-cache`) to recompute.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from pathlib import Path

from common import jsonio
from common.model import get_cache_dir

REPO = Path(__file__).resolve().parents[1]
# The code whose change changes a base evaluation's raw outputs.
CODE_FILES = (
    "common/data.py",
    "common/fast_generation.py",
    "common/generation.py",
    "common/loss.py",
    "common/model.py",
)
PACKAGES = ("torch", "transformers", "peft", "tokenizers", "accelerate")
CACHE_ENV = "UNDERWRITE_EVAL_CACHE"


def cache_dir() -> Path:
    """The folder of cached base evaluations: `$UNDERWRITE_EVAL_CACHE`, else beside the converted models."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return get_cache_dir().parent / "base-eval"


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of one file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_digest(folder: str | Path) -> str:
    """sha256 over a model folder's files (names and bytes): weights, config, tokenizer, template.

    Args:
        folder: a local model folder.

    Returns:
        The hex digest.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def environment_parts() -> dict:
    """Package versions, Python version and the digest of the code that produces the outputs."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    code = hashlib.sha256(b"".join((REPO / name).read_bytes() for name in CODE_FILES)).hexdigest()
    return {"packages": versions, "python": platform.python_version(), "code": code}


def cache_key(parts: dict) -> tuple[str, dict]:
    """The key of an evaluation described by `parts`, with the environment added to them.

    Args:
        parts: JSON-serializable description: model digest, data digest, settings, precision.

    Returns:
        (hex sha256 key, the full parts it was computed from).
    """
    full = parts | {"environment": environment_parts()}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest(), full


def entry_path(key: str) -> Path:
    """Where the entry of `key` is stored."""
    return cache_dir() / f"{key[:32]}.json"


def load_entry(key: str) -> dict | None:
    """The cached outputs of `key`, or None when there is no readable entry with exactly that key."""
    path = entry_path(key)
    try:
        entry = jsonio.read_json(path)
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == key else None


def save_entry(key: str, parts: dict, outputs: dict) -> Path:
    """Store `outputs` under `key` (written atomically by `jsonio.write_json`).

    Args:
        key, parts: from `cache_key`.
        outputs: the raw evaluation outputs (JSON-serializable).

    Returns:
        The entry's path.
    """
    path = entry_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write_json(path, {"key": key, "parts": parts, "outputs": outputs})
    return path
