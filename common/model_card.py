"""The model card (README.md) of an export: YAML front matter, then one function per section.

    from common.model_card import render_model_card

Every argument must already be redacted (common.artifacts.redact_secrets). A fact that is missing
is stated as missing, never left blank.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.artifacts import ALIAS_HUB_IDS

# evaluate.py metrics shown in the model card (flattened key prefixes of metrics["models"][name]).
EVAL_CARD_METRICS = ("loss.mean", "perplexity.value", "rouge.", "decision.overall.", "outcome_accuracy_ci.mean")


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


@dataclass
class CardInputs:
    """What the model card is rendered from (export.py gathers it, secrets already redacted)."""

    name: str  # the export's name and version
    version: str
    base_model: str  # the base as the user passed it to train.py (alias, folder or hub id)
    adapter_config: Mapping  # the exported adapter_config.json
    run_config: Mapping  # the run's config.json (args, derived, lora, versions, git_commit, dataset, seed)
    summary: Mapping | None  # the run's summary.json, or None if training did not finish
    metrics: Mapping  # the exported metrics.json ({"validation", "baseline", optional "test", "checkpoint"})
    samples: Sequence[Mapping]  # up to a few sample generations ({"prompt_messages", "reference", "generated"})
    memory: Mapping[str, int]  # from `common.artifacts.estimate_inference_memory`
    memory_note: str  # how the parameter counts were obtained
    lineage: Mapping[str, str]  # {"run", "checkpoint", "git_commit", "run_created", "exported"} (shown as listed)
    # for an embedded alias, the one command that rebuilds the converted base folder recorded in
    # adapter_config.json on another machine (`common.embedded_model.recreate_command`)
    base_recreate: str | None = None
    stop_tokens: Sequence[str] = ()  # the end-of-turn token(s) as text (generation_config.json's eos)
    gguf: Mapping | None = None  # gguf/gguf_check.json when the export has GGUF files (`export.py --gguf`)


def render_model_card(card: CardInputs) -> str:
    """Render the export's README.md: YAML front matter + every section the issue asks for (markdown text)."""
    name, version, base_model, run_config = card.name, card.version, card.base_model, card.run_config
    args, derived = run_config.get("args", {}), run_config.get("derived", {})
    quantization = args.get("quantization") or "none"
    hub_id = ALIAS_HUB_IDS.get(base_model, base_model)
    is_hub_id = hub_id.count("/") == 1 and not Path(hub_id).exists() and not hub_id.startswith((".", "/", "~"))
    out = front_matter(name, version, base_model, hub_id if is_hub_id else None, quantization)
    out += base_model_section(base_model, hub_id, is_hub_id, card.adapter_config, quantization, card.base_recreate)
    out += dataset_section(run_config.get("dataset", {}), derived)
    out += hyperparameters_section(card.adapter_config, args, derived, run_config.get("seed"))
    out += training_section(card.summary, derived)
    out += metrics_section(card.metrics)
    out += samples_section(card.samples)
    out += use_and_limitations_section(base_model, args.get("max_seq_len", "the training max_seq_len"))
    out += inference_section(card.memory, card.memory_note, run_config.get("versions", {}))
    out += how_to_load_section(f"{name}-v{version}", quantization)
    out += run_it_section(
        name, f"{name}-v{version}", str(card.adapter_config.get("base_model_name_or_path")), card.stop_tokens, card.gguf
    )
    out += ["", "## Lineage", ""]
    out += [f"- {key.replace('_', ' ')}: `{value}`" for key, value in card.lineage.items()]
    return "\n".join(out) + "\n"


def front_matter(name: str, version: str, base_model: str, hub_id: str | None, quantization: str) -> list[str]:
    """The YAML front matter (the hub reads base_model, tags), the title and the one-line description."""
    method = "QLoRA (NF4 base)" if quantization == "nf4" else "LoRA"
    front = {"library_name": "peft", "pipeline_tag": "text-generation", "model_name": name, "version": version}
    if hub_id:
        front["base_model"] = hub_id
    front["tags"] = ["lora", "qlora" if quantization == "nf4" else "peft", "insurance", "underwriting", "chat"]
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name} v{version}", ""]
    out.append(
        f"A {method} adapter for `{base_model}` finetuned on insurance underwriting conversations: it asks "
        "for missing facts and ends with a machine-readable `DECISION:` line."
    )
    return out


def base_model_section(
    base_model: str, hub_id: str, is_hub_id: bool, adapter_config: Mapping, quantization: str, recreate: str | None
) -> list[str]:
    """Which base, what adapter_config.json records, how to get that base elsewhere, its precision."""
    out = ["", "## Base model", ""]
    out.append(f"- Base: `{base_model}`" + (f" (Hugging Face: `{hub_id}`)" if hub_id != base_model else ""))
    recorded = adapter_config.get("base_model_name_or_path")
    out.append(f"- Recorded in adapter_config.json: `{recorded}` (plain PEFT and transformers load the base from it)")
    if recreate:
        out.append(
            f"- `{recorded}` is `{base_model}` converted by this project: the de-quantized GGUF copy of `{hub_id}` "
            "the adapter was trained on (its weights differ slightly from the hub model's). On another machine, "
            f"recreate that folder with one command in a checkout of this project: `{recreate}`"
        )
    elif not is_hub_id:
        out.append(
            "- A local folder: on another machine put the same base at that path, or edit "
            "`base_model_name_or_path` in adapter_config.json"
        )
    precision = "4-bit NF4 + double quantization" if quantization == "nf4" else "not quantized"
    out.append(f"- Base precision during training: {precision}")
    return out


def dataset_section(dataset: Mapping, derived: Mapping) -> list[str]:
    """The data files with their sha256, the held-out validation split, the example counts."""
    out = ["", "## Dataset", ""]
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
    return out + (dataset_lines or ["- not recorded in the run's config.json"])


def hyperparameters_section(adapter_config: Mapping, args: Mapping, derived: Mapping, seed: int | None) -> list[str]:
    """The LoRA settings and every train.py argument and derived value."""
    out = ["", "## Training hyperparameters", ""]
    lora_keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_dora", "use_rslora")
    lora_rows = [(k, adapter_config[k]) for k in lora_keys if adapter_config.get(k) is not None]
    out += ["LoRA (adapter_config.json):", "", _table(("setting", "value"), lora_rows), ""]
    derived_keys = ("total_steps", "grad_accum", "warmup_steps", "num_processes", "trainable_params", "trainable_pct")
    rows = [(k, v) for k, v in args.items() if isinstance(v, int | float | str | bool | list) and v != ""]
    rows += [(k, derived[k]) for k in derived_keys if k in derived]
    if "seed" not in args and seed is not None:
        rows.append(("seed", seed))
    out += ["train.py arguments and derived values (config.json):", "", _table(("setting", "value"), rows)]
    return out


def training_section(summary: Mapping | None, derived: Mapping) -> list[str]:
    """How the run ended, its time, throughput and memory, and the hardware."""
    out = ["", "## Training time and hardware", ""]
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
    return out


def metrics_section(metrics: Mapping) -> list[str]:
    """Validation against the baseline at the exported step, then each evaluate.py result."""
    validation, baseline = metrics.get("validation", {}), metrics.get("baseline", {})
    out = ["", "## Metrics", ""]
    step = metrics.get("checkpoint", {}).get("step")
    rows = []
    for key in ("val_loss", "val_ppl"):
        if key in validation:
            rows.append((f"validation {key}", baseline.get(key, "not recorded"), validation[key]))
    if metrics.get("checkpoint", {}).get("averaged_from"):  # average_adapters.py's output is no step of the run
        out.append(
            "- validation: not a checkpoint of the run, so train.py never scored it; evaluate.py's results follow"
        )
    else:
        out.append(f"Validation at step {step} (baseline = the untouched base model, step 0):")
        out += [
            "",
            _table(("metric", "baseline", "finetuned"), rows) if rows else "- no validation recorded at this step",
        ]
    test = {k: v for k, v in metrics.items() if k not in ("validation", "baseline", "checkpoint")}
    for label, evaluation in test.items():
        out += ["", f"evaluate.py on `{evaluation.get('data_file', label)}` ({label}):", ""]
        out += evaluation_lines(evaluation)
    if not test:
        out += ["", "- test metrics: evaluate.py has not been run on this checkpoint (`python evaluate.py`)"]
    return out


def evaluation_lines(evaluation: Mapping) -> list[str]:
    """One evaluate.py metrics.json as a base-vs-finetuned table with the paired loss change."""
    models = evaluation.get("models", {})
    if "base" not in models or "finetuned" not in models:  # another shape: show every number it holds
        return [_table(("metric", "value"), list(_flatten(evaluation).items()))]
    flat_base, flat_tuned = _flatten(models["base"]), _flatten(models["finetuned"])
    keys = [k for k in flat_tuned if k in flat_base and k.startswith(EVAL_CARD_METRICS) and k != "decision.overall.n"]
    out = [_table(("metric", "baseline", "finetuned"), [(k, flat_base[k], flat_tuned[k]) for k in keys])]
    comparison = evaluation.get("comparison", {})
    if "loss_delta" in comparison:
        delta = comparison["loss_delta"]
        interval = f"{_fmt(delta.get('mean'))} [{_fmt(delta.get('low'))}, {_fmt(delta.get('high'))}]"
        out.append(
            f"\nLoss change (finetuned - base, paired bootstrap 95% interval): {interval}, "
            f"significant: {comparison.get('significant')}"
        )
    return out


def samples_section(samples: Sequence[Mapping]) -> list[str]:
    """Each sample's last user turn, the generated reply and the reference."""
    out = ["", "## Sample generations", ""]
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
    return out


def use_and_limitations_section(base_model: str, max_seq_len: object) -> list[str]:
    """What the adapter is for, and what it must not be used for."""
    out = ["", "## Intended use", ""]
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
        f"to {max_seq_len} tokens."
    )
    return out


def inference_section(memory: Mapping[str, int], memory_note: str, versions: Mapping) -> list[str]:
    """Memory per base dtype and the packages it needs."""
    out = ["", "## Inference requirements", ""]
    out.append(_table(("base dtype", "weights + adapter"), [(k, _mb(v)) for k, v in memory.items()]))
    out += ["", f"{memory_note} Add the KV cache and activations on top (they grow with batch and length).", ""]
    out.append(
        "Packages: transformers and peft (bitsandbytes for NF4); trained with "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + "."
    )
    return out


def how_to_load_section(folder: str, quantization: str) -> list[str]:
    """Loading with plain peft/transformers (no code from this project), or merging."""
    out = ["", "## How to load", "", "With peft and transformers alone (no code from this project):", "", "```python"]
    nf4_hint = (
        [
            "# trained on a 4-bit base: add quantization_config=BitsAndBytesConfig(load_in_4bit=True,",
            '#     bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) to load it the same way',
        ]
        if quantization == "nf4"
        else []
    )
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
    return out


def run_it_section(name: str, folder: str, base: str, stop_tokens: Sequence[str], gguf: Mapping | None) -> list[str]:
    """Serving commands (llama.cpp, Ollama, vLLM), each with the stop token, and the GGUF checks' numbers."""
    stops = ", ".join(f"`{t}`" for t in stop_tokens) or "the eos_token_id of generation_config.json"
    stop_json = "[" + ", ".join(f'"{t}"' for t in stop_tokens) + "]"
    out = [
        "",
        "## Run it",
        "",
        f"Every reply ends with the end-of-turn token {stops}: stop there (stop strings `{stop_json}`).",
    ]
    out += ["", "```bash"]
    if gguf:
        files = gguf["files"]
        first = gguf["modelfile"]["from"]
        out += [
            f'# llama.cpp: chat template and EOS ({stops}) come from the GGUF; raw /completion requests: "stop": {stop_json}',
            f"llama-server -m exports/{folder}/gguf/{first} --jinja",
        ]
        if "lora" in gguf:
            out.append(f"llama-server -m <GGUF of {base}> --lora exports/{folder}/gguf/{gguf['lora']['file']} --jinja")
        out += [
            "# Ollama: the Modelfile holds the TEMPLATE, SYSTEM and PARAMETER stop " + stop_json,
            f"cd exports/{folder}/gguf && ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}",
        ]
    out += [
        f"# vLLM, merged model (stops at generation_config.json's eos {stops}):",
        f"python merge_and_load.py --adapter exports/{folder} --output merged/{folder}",
        f"vllm serve merged/{folder}",
        f'# vLLM, the adapter on its base; requests to model {name} add "stop": {stop_json}',
        f"vllm serve {base} --enable-lora --lora-modules {name}=exports/{folder}",
        "```",
    ]
    if not gguf:
        return [*out, "", f"No GGUF in this export: `python export.py ... --gguf f16,q8_0` writes {folder}/gguf/."]
    rows = [
        (
            t,
            _mb(r["bytes"]),
            r["transformers"]["max_abs_logit_diff"],
            f"{r['transformers']['identical_generations']}/{r['transformers']['prompts']}"
            + (
                f" (+{r['transformers']['near_tie_divergences']} at a near tie)"
                if r["transformers"].get("near_tie_divergences")
                else ""
            ),
        )
        for t, r in files.items()
    ]
    out += [
        "",
        f"GGUF checks (gguf/gguf_check.json; {gguf['prompts']} validation prompts, greedy up to {gguf['max_new_tokens']} tokens):",
        "",
    ]
    out.append(_table(("GGUF", "size", "max abs logit diff vs merged", "greedy text identical"), rows))
    return out
