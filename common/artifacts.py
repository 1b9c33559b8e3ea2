"""Helpers for exporting and merging adapters: safe names, secret redaction, generation config,
NF4 round trip, inference-memory estimate, the model card and atomic folder publishing.

    from common.artifacts import redact_secrets, secret_env_values, validate_export_name
    name = validate_export_name("underwrite", "--name")            # raises ValueError on "../x"
    clean = redact_secrets(run_config, secret_env_values())         # {"hf_token": "<redacted>", ...}
    memory = estimate_inference_memory(quantizable_params=..., other_params=..., adapter_bytes=...)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml

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
# evaluate.py metrics shown in the model card (flattened key prefixes of metrics["models"][name]).
EVAL_CARD_METRICS = ("loss.mean", "perplexity.value", "rouge.", "decision.overall.", "outcome_accuracy_ci.mean")


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


def publish_dir(tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Rename a finished temp folder into place; with `overwrite`, the old folder is replaced.

    Args:
        tmp_dir: the fully written folder (a sibling of `final_dir`, so the rename is atomic).
        final_dir: where it should appear.
        overwrite: replace an existing `final_dir`.

    Raises:
        FileExistsError: `final_dir` exists (or appeared meanwhile) and `overwrite` is False.
    """
    final_dir = Path(final_dir)
    old = final_dir.with_name(f".{final_dir.name}.old")
    if final_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{final_dir} already exists")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    try:
        # rename (not replace): fails if another process published the same folder meanwhile
        os.rename(tmp_dir, final_dir)
    except OSError:
        if old.exists() and not final_dir.exists():
            os.replace(old, final_dir)
        raise FileExistsError(f"{final_dir} appeared while writing; not overwritten") from None
    shutil.rmtree(old, ignore_errors=True)


# --- model card ---


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [
        "| " + " | ".join(_fmt(cell).replace("|", "\\|").replace("\n", " ") for cell in row) + " |" for row in rows
    ]
    return "\n".join(lines)


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB" if num_bytes < 2**30 else f"{num_bytes / 2**30:,.2f} GiB"


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.0f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def _flatten(data: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, int | float | str | bool):
            flat[f"{prefix}{key}"] = value
    return flat


def _shorten(text: str, limit: int = 600) -> str:
    text = str(text).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def render_model_card(
    *,
    name: str,
    version: str,
    base_model: str,
    adapter_config: Mapping,
    run_config: Mapping,
    summary: Mapping | None,
    metrics: Mapping,
    samples: Sequence[Mapping],
    memory: Mapping[str, int],
    memory_note: str,
    lineage: Mapping[str, str],
    base_recreate: str | None = None,
) -> str:
    """Render the export's README.md: YAML front matter + every section the issue asks for.

    Every argument must already be redacted. Missing facts are stated as missing, never left blank.

    Args:
        name, version: the export's name and version.
        base_model: the base as the user passed it to train.py (alias, folder or hub id).
        adapter_config: the exported adapter_config.json.
        run_config: the run's config.json (args, derived, lora, versions, git_commit, dataset, seed).
        summary: the run's summary.json, or None if training did not finish.
        metrics: the exported metrics.json ({"validation", "baseline", optional "test", "checkpoint"}).
        samples: up to a few sample generations ({"prompt_messages", "reference", "generated"}).
        memory: from `estimate_inference_memory`.
        memory_note: how the parameter counts were obtained.
        lineage: {"run", "checkpoint", "git_commit", "run_created", "exported"} (shown as listed).
        base_recreate: for an embedded alias, the one command that rebuilds the converted base folder
            recorded in adapter_config.json on another machine (`common.model.recreate_command`).

    Returns:
        The markdown text.
    """
    args, derived = run_config.get("args", {}), run_config.get("derived", {})
    quantization = args.get("quantization") or "none"
    method = "QLoRA (NF4 base)" if quantization == "nf4" else "LoRA"
    hub_id = ALIAS_HUB_IDS.get(base_model, base_model)
    is_hub_id = hub_id.count("/") == 1 and not Path(hub_id).exists() and not hub_id.startswith((".", "/", "~"))
    front = {"library_name": "peft", "pipeline_tag": "text-generation", "model_name": name, "version": version}
    if is_hub_id:
        front["base_model"] = hub_id
    front["tags"] = ["lora", "qlora" if quantization == "nf4" else "peft", "insurance", "underwriting", "chat"]
    dataset = run_config.get("dataset", {})
    versions = run_config.get("versions", {})
    validation, baseline = metrics.get("validation", {}), metrics.get("baseline", {})

    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name} v{version}", ""]
    out.append(
        f"A {method} adapter for `{base_model}` finetuned on insurance underwriting conversations: it asks "
        "for missing facts and ends with a machine-readable `DECISION:` line."
    )
    out += ["", "## Base model", ""]
    out.append(f"- Base: `{base_model}`" + (f" (Hugging Face: `{hub_id}`)" if hub_id != base_model else ""))
    recorded = adapter_config.get("base_model_name_or_path")
    out.append(f"- Recorded in adapter_config.json: `{recorded}` (plain PEFT and transformers load the base from it)")
    if base_recreate:
        out.append(
            f"- `{recorded}` is `{base_model}` converted by this project: the de-quantized GGUF copy of `{hub_id}` "
            "the adapter was trained on (its weights differ slightly from the hub model's). On another machine, "
            f"recreate that folder with one command in a checkout of this project: `{base_recreate}`"
        )
    elif not is_hub_id:
        out.append(
            "- A local folder: on another machine put the same base at that path, or edit "
            "`base_model_name_or_path` in adapter_config.json"
        )
    precision = "4-bit NF4 + double quantization" if quantization == "nf4" else "not quantized"
    out.append(f"- Base precision during training: {precision}")
    out += ["", "## Dataset", ""]
    dataset_lines = [
        f"- {split}: `{dataset[f'{split}_file']}` sha256 `{dataset.get(f'{split}_sha256', 'not recorded')}`"
        for split in ("train", "validation")
        if dataset.get(f"{split}_file")
    ]
    split = dataset.get("validation_split")
    if split:
        dataset_lines.append(
            f"- validation: {split['validation_examples']} examples held out of `{split['source']}` "
            f"(--validation-split {split['fraction']}, seed {split['seed']}; their indices are in training_args.json)"
        )
    dataset_lines += [
        f"- {k.replace('_', ' ')}: {derived[k]}" for k in ("train_examples", "validation_examples") if k in derived
    ]
    out += dataset_lines or ["- not recorded in the run's config.json"]
    out += ["", "## Training hyperparameters", ""]
    lora_keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora", "use_rslora")
    lora_rows = [(k, adapter_config[k]) for k in lora_keys if adapter_config.get(k) is not None]
    out += ["LoRA (adapter_config.json):", "", _table(("setting", "value"), lora_rows), ""]
    derived_keys = ("total_steps", "grad_accum", "warmup_steps", "num_processes", "trainable_params", "trainable_pct")
    rows = [(k, v) for k, v in args.items() if isinstance(v, int | float | str | bool | list) and v != ""]
    rows += [(k, derived[k]) for k in derived_keys if k in derived]
    if "seed" not in args and run_config.get("seed") is not None:
        rows.append(("seed", run_config["seed"]))
    out += ["train.py arguments and derived values (config.json):", "", _table(("setting", "value"), rows)]
    out += ["", "## Training time and hardware", ""]
    if summary:
        out.append(
            f"- status: {summary.get('status')} after {summary.get('global_step')} optimizer steps "
            f"({summary.get('epochs_completed')} epochs), stop reason: {summary.get('stop_reason') or 'none'}"
        )
        out.append(
            f"- training time: {_duration(float(summary.get('train_time_s', 0)))}, "
            f"throughput {_fmt(summary.get('tokens_per_s'))} tokens/s, MFU {_fmt(summary.get('mfu'))}, "
            f"peak memory {_fmt(summary.get('peak_mem_mb'))} MB"
        )
    else:
        out.append("- summary.json is missing: the run did not finish (exported from an intermediate checkpoint)")
    device = derived.get("device_name") or derived.get("device", "not recorded")
    out.append(
        f"- hardware: {device}, {derived.get('num_processes', 1)} process(es), "
        f"mixed precision {derived.get('mixed_precision', 'not recorded')}"
    )
    out += ["", "## Metrics", ""]
    step = metrics.get("checkpoint", {}).get("step")
    rows = []
    for key in ("val_loss", "val_ppl"):
        if key in validation:
            rows.append((f"validation {key}", baseline.get(key, "not recorded"), validation[key]))
    out.append(f"Validation at step {step} (baseline = the untouched base model, step 0):")
    out += ["", _table(("metric", "baseline", "finetuned"), rows) if rows else "- no validation recorded at this step"]
    test = {k: v for k, v in metrics.items() if k not in ("validation", "baseline", "checkpoint")}
    for label, evaluation in test.items():
        out += ["", f"evaluate.py on `{evaluation.get('data_file', label)}` ({label}):", ""]
        models = evaluation.get("models", {})
        if "base" in models and "finetuned" in models:
            flat_base, flat_tuned = _flatten(models["base"]), _flatten(models["finetuned"])
            keys = [
                k
                for k in flat_tuned
                if k in flat_base and k.startswith(EVAL_CARD_METRICS) and k != "decision.overall.n"
            ]
            out.append(_table(("metric", "baseline", "finetuned"), [(k, flat_base[k], flat_tuned[k]) for k in keys]))
            comparison = evaluation.get("comparison", {})
            if "loss_delta" in comparison:
                delta = comparison["loss_delta"]
                interval = f"{_fmt(delta.get('mean'))} [{_fmt(delta.get('low'))}, {_fmt(delta.get('high'))}]"
                out.append(
                    f"\nLoss change (finetuned - base, paired bootstrap 95% interval): {interval}, "
                    f"significant: {comparison.get('significant')}"
                )
        else:  # another shape: show every number it holds
            out.append(_table(("metric", "value"), list(_flatten(evaluation).items())))
    if not test:
        out += ["", "- test metrics: evaluate.py has not been run on this checkpoint (`python evaluate.py`)"]
    out += ["", "## Sample generations", ""]
    for i, sample in enumerate(samples, start=1):
        user_turns = [m["content"] for m in sample.get("prompt_messages", []) if m.get("role") == "user"]
        out += [
            f"**Sample {i}** (`{sample.get('id', i)}`), last user turn:",
            "",
            "```text",
            _shorten(user_turns[-1] if user_turns else ""),
            "```",
        ]
        out += ["Generated:", "", "```text", _shorten(sample.get("generated", "")), "```"]
        out += ["Reference:", "", "```text", _shorten(sample.get("reference", "")), "```", ""]
    if not samples:
        out.append("- no sample generations were recorded for this checkpoint")
    out += ["", "## Intended use", ""]
    out.append(
        "Drafting underwriting questions and a suggested decision for a human underwriter to review, on "
        "conversations like the training data (term life and similar lines, English). Always parse and "
        "check the `DECISION:` line; do not act on it without review."
    )
    out += ["", "## Limitations", ""]
    out.append(
        "- Trained on a small, synthetic, rule-generated dataset: it imitates that rulebook and can state "
        "wrong rules or decisions with confidence, especially for cases unlike the training data.\n"
        "- Not a source of legal, medical or pricing advice; not evaluated for fairness across applicant "
        "groups; must not be the sole basis of an underwriting decision.\n"
        f"- Small base model (`{base_model}`): limited reasoning and knowledge; long conversations are truncated "
        f"to {args.get('max_seq_len', 'the training max_seq_len')} tokens."
    )
    out += ["", "## Inference requirements", ""]
    out.append(_table(("base dtype", "weights + adapter"), [(k, _mb(v)) for k, v in memory.items()]))
    out += ["", f"{memory_note} Add the KV cache and activations on top (they grow with batch and length).", ""]
    out.append(
        "Packages: transformers and peft (bitsandbytes for NF4); trained with "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + "."
    )
    out += ["", "## How to load", "", "With peft and transformers alone (no code from this project):", "", "```python"]
    nf4_hint = (
        [
            "# trained on a 4-bit base: add quantization_config=BitsAndBytesConfig(load_in_4bit=True,",
            '#     bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) to load it the same way',
        ]
        if quantization == "nf4"
        else []
    )
    folder = f"{name}-v{version}"
    out += [
        "import torch",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer, pipeline",
        "",
        *nf4_hint,
        f'model = AutoPeftModelForCausalLM.from_pretrained("{folder}", dtype=torch.bfloat16)  # base: adapter_config.json',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder}")  # with the chat template it was trained with',
        'messages = [{"role": "user", "content": "Applicant is 45, smoker, wants 500k term life."}]',
        "inputs = tokenizer.apply_chat_template(",
        "    messages, add_generation_prompt=True, return_tensors='pt', return_dict=True",
        ")",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=128)[0], skip_special_tokens=True))",
        "",
        f'chat = pipeline("text-generation", model="{folder}")  # the same in one line',
        "print(chat(messages, max_new_tokens=128)[0]['generated_text'][-1]['content'])",
        "```",
        "",
        f'`PeftModel.from_pretrained(base, "{folder}")` works as well on a base you loaded yourself. Or merge it '
        f"into the base: `python merge_and_load.py --adapter exports/{folder}`.",
    ]
    out += ["", "## Lineage", ""]
    out += [f"- {key.replace('_', ' ')}: `{value}`" for key, value in lineage.items()]
    return "\n".join(out) + "\n"
