"""Helpers for exporting and merging adapters: safe names, secret redaction, generation config,
NF4 round trip, inference-memory estimate, the model card and atomic folder publishing.

    from common.artifacts import redact_secrets, secret_env_values, validate_export_name
    name = validate_export_name("underwrite", "--name")            # raises ValueError on "../x"
    clean = redact_secrets(run_config, secret_env_values())         # {"hf_token": "<redacted>", ...}
    memory = estimate_inference_memory(quantizable_params=..., other_params=..., adapter_bytes=...)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from common.data import end_of_turn_token_ids

REDACTED = "<redacted>"
# Environment variables whose values must never be written anywhere; any variable whose name looks
# secret (see `is_secret_key`) is added to these.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY")
# A key is secret when one of its words is one of these ("hf_token", "wandbApiKey", "db_password")...
SECRET_WORDS = {"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials", "auth"}
# ...unless its last word says it holds a number or a type ("pad_token_id", "max_token_len").
NON_SECRET_LAST_WORDS = {"id", "ids", "index", "indices", "len", "length", "count", "size", "limit", "type", "dtype"}
HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{30,}")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Embedded aliases (common.model.EMBEDDED_MODELS) and the hub model each one is a copy of.
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# NF4 with double quantization: 4-bit codes, one 8-bit absmax per 64 weights, one fp32 constant per
# 256 absmax blocks (bitsandbytes defaults). Embeddings, norms and the LM head stay in 16-bit.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", str(key))
    return [word for word in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if word]


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret: a word token/key/secret/password/... (see SECRET_WORDS).

    Whole words are matched, so "max_new_tokens", "tokenizer" and "keep_last" are not secret, while
    "hf_token", "wandbApiKey" and "db_password" are. "secret"/"password" anywhere is always secret.

    Args:
        key: a dictionary key or an environment variable name.

    Returns:
        True if values under this key must be redacted.
    """
    lowered = str(key).lower()
    if "secret" in lowered or "password" in lowered:
        return True
    words = _key_words(key)
    return bool(words) and words[-1] not in NON_SECRET_LAST_WORDS and any(word in SECRET_WORDS for word in words)


def secret_env_values(environ: Mapping[str, str] | None = None, min_length: int = 8) -> list[str]:
    """Values of secret environment variables (HF_TOKEN, WANDB_API_KEY, anything named like a secret).

    Args:
        environ: the environment to read (defaults to `os.environ`).
        min_length: shorter values are ignored (redacting "1" everywhere would destroy every number).

    Returns:
        The secret values, longest first (so a value containing another is replaced whole).
    """
    environ = os.environ if environ is None else environ
    values = {
        value for name, value in environ.items() if (name in SECRET_ENV_VARS or is_secret_key(name)) and value.strip()
    }
    return sorted((v for v in values if len(v) >= min_length), key=len, reverse=True)


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


def redact_secrets(data: object, secrets: Sequence[str] = ()) -> object:
    """Return a copy of `data` with secrets replaced by "<redacted>".

    Redacted: every non-empty value under a secret key (`is_secret_key`), every occurrence of a
    value in `secrets` inside any string, and anything shaped like a Hugging Face token (hf_...).

    Args:
        data: nested dicts/lists/scalars (e.g. a run config).
        secrets: literal secret values to scrub from strings (`secret_env_values()` + `collect_secret_values`).

    Returns:
        The redacted copy; `data` is not modified.
    """
    if isinstance(data, Mapping):
        return {
            key: REDACTED if is_secret_key(key) and value not in (None, "", [], {}) else redact_secrets(value, secrets)
            for key, value in data.items()
        }
    if isinstance(data, list | tuple):
        return [redact_secrets(value, secrets) for value in data]
    if isinstance(data, str):
        for secret in secrets:
            data = data.replace(secret, REDACTED)
        return HF_TOKEN_PATTERN.sub(REDACTED, data)
    return data


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
