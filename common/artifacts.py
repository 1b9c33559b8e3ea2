"""Helpers for exporting, merging and evaluating adapters: safe names, secret scans, generation config,
NF4 round trip, inference-memory estimate, the saved chat template, the model card and atomic folder publishing.

    from common.artifacts import validate_export_name, find_secrets_in_folder
    name = validate_export_name("underwrite", "--name")            # raises ValueError on "../x"
    memory = estimate_inference_memory(quantizable_params=..., other_params=..., adapter_bytes=...)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file

from common.checkpoint import COMPLETE_MARKER, CheckpointError, assert_finite, verify
from common.data import end_of_turn_token_ids
from common.jsonio import read_json
from common.redact import HF_TOKEN_PATTERN, is_secret_key

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Embedded aliases (common.model.EMBEDDED_MODELS) and the hub model each one is a copy of.
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# NF4 with double quantization: 4-bit codes, one 8-bit absmax per 64 weights, one fp32 constant per
# 256 absmax blocks (bitsandbytes defaults). Embeddings, norms and the LM head stay in 16-bit.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def collect_secret_values(data: object, min_length: int = 8) -> list[str]:
    """String values stored under secret keys anywhere in a nested structure (e.g. a run config).

    Args:
        data: nested dicts/lists.
        min_length: shorter values are ignored.

    Returns:
        The values, so they can also be scrubbed from free text and scanned for in exported files.
    """
    found = set()
    if isinstance(data, Mapping):
        for key, value in data.items():
            if is_secret_key(key) and isinstance(value, str) and len(value) >= min_length:
                found.add(value)
            found.update(collect_secret_values(value, min_length))
    elif isinstance(data, list | tuple):
        for value in data:
            found.update(collect_secret_values(value, min_length))
    return sorted(found, key=len, reverse=True)


def find_secrets_in_folder(folder: Path, secrets: Sequence[str]) -> list[Path]:
    """Files under `folder` whose bytes contain one of `secrets` or an hf_... token (a last-line check).

    Args:
        folder: the folder about to be published.
        secrets: literal secret values.

    Returns:
        The offending files (empty when clean).
    """
    needles = [secret.encode() for secret in secrets if secret]
    token_pattern = re.compile(HF_TOKEN_PATTERN.pattern.encode())
    leaks = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if any(needle in data for needle in needles) or token_pattern.search(data):
                leaks.append(path)
    return leaks


def validate_export_name(value: str, what: str) -> str:
    """Check that a name or version is one plain folder-name component.

    Args:
        value: e.g. "underwrite" or "1.0".
        what: the flag it came from, for the message (e.g. "--name").

    Returns:
        `value` unchanged.

    Raises:
        ValueError: path separators, "..", a leading dot or other characters that could escape the
            exports folder or hide the export.
    """
    if not NAME_PATTERN.match(value or "") or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-' only (no '/', no '..', "
            "not starting with '.' or '-', at most 100 characters), e.g. --name underwrite --version 1.0"
        )
    return value


def build_generation_config(tokenizer, base_generation_config=None):
    """A generation config that stops at the end of an assistant turn (`common.data.end_of_turn_token_ids`).

    Args:
        tokenizer: the chat tokenizer.
        base_generation_config: the base model's `GenerationConfig` (its sampling defaults are kept),
            or None to start from an empty one.

    Returns:
        A `transformers.GenerationConfig` with eos_token_id = end-of-turn id(s) and pad_token_id set.
    """
    from transformers import GenerationConfig

    config = GenerationConfig() if base_generation_config is None else base_generation_config
    eos_ids = end_of_turn_token_ids(tokenizer)
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    return config


def count_base_parameters(model_config) -> dict:
    """Count a model's parameters from its config without allocating weights (meta device).

    Args:
        model_config: a transformers `PretrainedConfig`.

    Returns:
        {"quantizable": params of the linear layers bitsandbytes turns into NF4 (all but the LM head),
         "other": embeddings, norms, LM head (tied weights counted once), "total": both}
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    quantizable = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    )
    total = sum(p.numel() for p in model.parameters())
    return {"quantizable": quantizable, "other": total - quantizable, "total": total}


def estimate_inference_memory(quantizable_params: int, other_params: int, adapter_bytes: int) -> dict:
    """Weight memory of the adapter on its base, per base dtype (KV cache and activations not included).

    fp16/bf16: 2 bytes per base parameter. NF4: `NF4_BYTES_PER_PARAM` (~0.516 with double quantization)
    for the quantized linear layers, 2 bytes for the rest (embeddings, norms, LM head).

    Args:
        quantizable_params: parameters of the linear layers that NF4 quantizes.
        other_params: every other base parameter.
        adapter_bytes: the adapter's tensors as stored (kept in their own dtype at inference).

    Returns:
        {"fp16": bytes, "bf16": bytes, "nf4": bytes}, each including the adapter.
    """
    half = 2 * (quantizable_params + other_params) + adapter_bytes
    nf4 = NF4_BYTES_PER_PARAM * quantizable_params + 2 * other_params + adapter_bytes
    return {"fp16": int(half), "bf16": int(half), "nf4": int(nf4)}


@torch.no_grad()
def round_trip_nf4(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every linear weight that NF4 would quantize by its quantize->dequantize round trip.

    This reproduces, in full precision, the base weights a QLoRA adapter was trained against:
    bitsandbytes quantizes the weights after casting them to the load dtype, with blocksize 64 and
    double quantization, and leaves the LM head unquantized (as transformers does).

    Args:
        model: a full-precision causal LM (modified in place; weights keep their dtype).
        dtype: the dtype the QLoRA run loaded the base in (its NF4 quant_state dtype).

    Returns:
        The number of linear layers rounded.
    """
    import bitsandbytes.functional as bnb_functional

    head = model.get_output_embeddings()
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            weight = module.weight
            packed, state = bnb_functional.quantize_4bit(
                weight.data.to(dtype), blocksize=64, compress_statistics=True, quant_type="nf4"
            )
            weight.data.copy_(bnb_functional.dequantize_4bit(packed, state).to(weight.dtype))
            count += 1
    return count


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


class Adapter(NamedTuple):
    """A checked adapter folder: its PEFT config, the base it was trained on, its weights."""

    path: Path
    config: dict  # adapter_config.json
    base_model: str  # base_model_name_or_path: the alias, folder or hub id train.py was given as --model
    tensors: dict  # adapter_model.safetensors


def precision_autocast(choice) -> torch.autocast:
    """Autocast in the dtype of `choice` (a `common.precision.PrecisionChoice`) on its device; a no-op for fp32."""
    enabled = choice.dtype != torch.float32
    return torch.autocast(choice.device, dtype=choice.dtype if enabled else torch.bfloat16, enabled=enabled)


def open_adapter(folder: Path, require_complete: bool = False) -> Adapter:
    """Check and read an adapter folder (best/, final/, a checkpoint, an export): safetensors, finite, and
    complete with matching hashes when train.py wrote it (or `require_complete`).

    Raises:
        CheckpointError: missing folder or files, incomplete or corrupted, or non-finite weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist; pass an adapter folder such as runs/<run>/best")
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} has no {', '.join(missing)} (only safetensors adapters are read); "
            "pass an adapter folder such as runs/<run>/best"
        )
    if require_complete or (folder / COMPLETE_MARKER).exists() or (folder / "trainer_state.json").exists():
        verify(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    assert_finite(tensors, str(folder))
    config = read_json(folder / "adapter_config.json")
    return Adapter(folder, config, str(config.get("base_model_name_or_path")), tensors)


def saved_chat_template(folder: Path) -> str | None:
    """`folder` when it holds a saved chat template (an adapter folder or export), else None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return str(folder)
    config = folder / "tokenizer_config.json"
    return str(folder) if config.is_file() and "chat_template" in json.loads(config.read_text()) else None
