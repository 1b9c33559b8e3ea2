"""Export a run's adapter as a versioned, self-describing folder (and optionally push it to the hub).

    python export.py --run runs/demo --version 1.0                       # -> exports/demo-v1.0/
    python export.py --run runs/demo --version 1.1 --name underwrite --output-dir /shared/exports
    python export.py --run runs/demo --version 1.0 --checkpoint runs/demo/checkpoints/step_000120 --force
    python export.py --run runs/demo --version 1.0 --push-to-hub my-org/underwrite-lora --private
    make gguf-setup && python export.py --run runs/demo --version 1.0 --gguf f16,q8_0   # + gguf/ (docs/gguf.md)

Load an export without this project: `peft.AutoPeftModelForCausalLM.from_pretrained("exports/demo-v1.0")`
or `transformers.pipeline("text-generation", model="exports/demo-v1.0")`.

What is written to <output-dir>/<name>-v<version>/:
    adapter_model.safetensors   the checkpoint's adapter, byte for byte
    adapter_config.json         PEFT config; base_model_name_or_path = the base the run trained on, as
                                plain PEFT/transformers open it: the hub id, an absolute folder, or for
                                the embedded default its converted folder (the card says how to rebuild it)
    tokenizer files             tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
    generation_config.json      eos_token_id = the end-of-turn token (<|im_end|> for the default), pad set
    training_args.json          the run's resolved config.json (secrets redacted)
    metrics.json                {"checkpoint", "validation", "baseline", "test" (evaluate.py, if run)}
    README.md                   model card (base, data + sha256, hyperparameters, time, hardware,
                                metrics vs baseline, samples, use and limits, memory, how to load, lineage)
    VERSION
    gguf/                       with --gguf TYPES: <name>-v<version>-<type>.gguf of the merged model (f32, f16,
                                bf16, q8_0; --quantize Q4_K_M needs llama-cpp-python), --gguf-lora: the adapter
                                as a llama.cpp LoRA GGUF, an Ollama Modelfile, and gguf_check.json: EOS, chat
                                template and pre-tokenizer in each GGUF; logits and greedy text of each GGUF
                                reloaded with transformers (and llama.cpp if installed) vs the merged model;
                                the Modelfile TEMPLATE rendered vs apply_chat_template. A failed check
                                publishes nothing (common/gguf_export.py, common/modelfile.py).

Safety: the checkpoint must have its COMPLETE marker and finite weights (the run's best/ by
default). Names and versions are single folder names (no "/", no ".."), so an export cannot land
outside --output-dir. Secrets (HF_TOKEN, WANDB_API_KEY, any config key named like token/key/secret/
password) are redacted, and the finished folder is scanned for them before it is published. The
folder is written under a temporary name and renamed into place; an existing version is replaced
only with --force. Only safetensors are written; `trust_remote_code` stays off unless asked for.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from common.artifacts import (
    build_generation_config,
    collect_secret_values,
    count_base_parameters,
    end_of_turn_token_ids,
    estimate_inference_memory,
    find_secrets_in_folder,
    open_adapter,
    validate_export_name,
)
from common.checkpoint import CheckpointError, publish_folder
from common.embedded_model import recreate_command
from common.gguf_export import (
    GGUF_TYPES,
    QUANTIZE_TYPES,
    GGUFError,
    build_merged_folder,
    check_gguf,
    check_gguf_tokenizer,
    convert_lora_to_gguf,
    convert_to_gguf,
    failed_checks,
    find_converter,
    llama_cpp_available,
    load_check_conversations,
    nf4_dtype_of,
    parse_each_gguf_once,
    quantize_gguf,
    run_reference,
)
from common.jsonio import read_json, read_jsonl, write_json
from common.model import (
    EMBEDDED_MODELS,
    ModelLoadError,
    load_config,
    load_tokenizer,
    prepare_chat_template,
    resolve_model_path,
)
from common.model_card import CardInputs, render_model_card
from common.modelfile import MULTI_TURN_CHECK, TemplateError, build_modelfile, check_modelfile, training_system_prompt
from common.redact import redact_secrets, secret_env_values

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
GGUF_CHECK_PROMPTS = 3  # validation prompts for the GGUF checks, each with up to...
GGUF_CHECK_NEW_TOKENS = 48  # ...this many greedy tokens


def is_locked(output_dir: Path) -> bool:
    """Whether a live run holds `output_dir/.lock`; a stale file left by a killed run does not count.

    Asks the kernel rather than the file's existence: a non-blocking shared `fcntl.flock` on the
    file fails only while a run holds its exclusive lock (the kernel drops that lock when the
    holder dies). A probe that succeeds is released at once; the file is neither created nor
    removed. Trap: for the instant the probe holds its shared lock, a run starting in this folder
    would be refused, so call this once, not in a loop.

    Args:
        output_dir: the run folder.

    Returns:
        True when a process (this one included, through `acquire_lock`) holds the lock, or when the
        file exists but cannot be opened to ask; False when there is no lock file or nobody holds it.
    """
    try:
        fd = os.open(output_dir / ".lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:  # cannot ask (e.g. no read permission): assume a run holds it
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases the probe's lock, if it got one
    return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Export a run's adapter with a model card, metrics and lineage.")
    # --- what to export ---
    parser.add_argument("--run", required=True, help="run folder written by train.py (runs/<run>)")
    parser.add_argument("--checkpoint", help="adapter folder to export (default: <run>/best, the lowest val ppl)")
    parser.add_argument("--version", required=True, help="export version, e.g. 1.0 (folder <name>-v<version>)")
    parser.add_argument("--name", help="export name (default: the run folder's name)")
    # --- where ---
    parser.add_argument("--output-dir", default="exports", help="folder that holds all exports")
    parser.add_argument("--force", action="store_true", help="replace an existing export of this version")
    parser.add_argument("--num-samples", type=int, default=3, help="sample generations shown in the model card")
    # --- hub ---
    parser.add_argument(
        "--push-to-hub", metavar="REPO", help="also upload the export to this hub repo (needs HF_TOKEN)"
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer/model code")
    parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the run's own")
    # --- GGUF for llama.cpp / Ollama / LM Studio (docs/gguf.md; run `make gguf-setup` once) ---
    parser.add_argument(
        "--gguf", metavar="TYPES", help=f"also write checked GGUFs of the merged model: {','.join(GGUF_TYPES)}"
    )
    parser.add_argument(
        "--gguf-lora", action="store_true", help="with --gguf: also the adapter as a llama.cpp LoRA GGUF"
    )
    parser.add_argument("--quantize", choices=sorted(QUANTIZE_TYPES), help="with --gguf: also llama.cpp's quantization")
    args = parser.parse_args(argv)

    run_dir = Path(args.run)
    if not (run_dir / "config.json").is_file():
        parser.error(f"--run {run_dir}: no config.json; pass a run folder written by train.py (runs/<run>)")
    args.name = args.name if args.name is not None else run_dir.resolve().name
    try:
        validate_export_name(args.name, "--name")
        validate_export_name(args.version, "--version")
    except ValueError as err:
        parser.error(str(err))
    if args.num_samples < 0:
        parser.error("--num-samples must be >= 0")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            parser.error(f"--push-to-hub {args.push_to_hub!r}: {err}")
    validate_gguf_args(parser, args)
    return args


def validate_gguf_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--gguf TYPES becomes a list; the converter (and llama-cpp-python for --quantize) must be installed.

    Raises:
        SystemExit: a bad flag (usage error), or a missing tool (one line saying what to run).
    """
    if args.gguf is None:
        if args.gguf_lora or args.quantize:
            parser.error("--gguf-lora and --quantize need --gguf TYPES (e.g. --gguf f16)")
        return
    args.gguf = list(dict.fromkeys(t.strip() for t in args.gguf.split(",") if t.strip()))
    unknown = [t for t in args.gguf if t not in GGUF_TYPES]
    if unknown or not args.gguf:
        given = ",".join(unknown) if unknown else "''"
        parser.error(f"--gguf {given}: choose among {','.join(GGUF_TYPES)}")
    if args.quantize and not {"f32", "bf16", "f16"} & set(args.gguf):
        parser.error("--quantize starts from a f32, bf16 or f16 GGUF: add f16 to --gguf")
    try:
        args.converter = find_converter()
    except GGUFError as err:
        sys.exit(f"export.py: error: --gguf: {err}")
    if args.quantize and not llama_cpp_available():
        sys.exit(
            "export.py: error: --quantize needs llama-cpp-python (a ~10 minute CPU build): pip install llama-cpp-python"
        )


def checkpoint_step(checkpoint: Path, checkpoint_metrics: dict | None) -> int | None:
    """The optimizer step of a checkpoint: from its metrics.json, else from its step_XXXXXX name."""
    if checkpoint_metrics and checkpoint_metrics.get("step") is not None:
        return int(checkpoint_metrics["step"])
    if checkpoint.name.startswith("step_") and checkpoint.name[5:].isdigit():
        return int(checkpoint.name[5:])
    return None


def build_metrics(run_dir: Path, checkpoint: Path, is_best: bool) -> dict:
    """metrics.json: validation at the checkpoint's step, the baseline, and evaluate.py's metrics."""
    checkpoint_metrics = read_json(checkpoint / "metrics.json", missing_ok=True)
    step = checkpoint_step(checkpoint, checkpoint_metrics)
    eval_log = read_jsonl(run_dir / "eval_log.jsonl")
    baseline = next((entry for entry in eval_log if entry.get("baseline")), {})
    at_step = next((e for e in eval_log if e.get("step") == step and not e.get("baseline")), {})
    validation = checkpoint_metrics or at_step
    averaged = read_json(checkpoint / "averaged_from.json", missing_ok=True)  # written by average_adapters.py
    keys = ("val_loss", "val_ppl", "val_tokens")
    metrics = {
        "checkpoint": {"path": str(checkpoint), "step": step, "epoch": validation.get("epoch", at_step.get("epoch"))},
        "validation": {k: validation[k] for k in keys if k in validation},
        "baseline": {k: baseline[k] for k in keys if k in baseline},
    }
    if averaged:
        metrics["checkpoint"]["averaged_from"] = [source["folder"] for source in averaged["adapters"]]
    # evaluate.py's numbers (runs/<run>/eval/) belong to the adapter it scored, usually best/.
    evaluation = read_json(run_dir / "eval" / "metrics.json", missing_ok=True)
    if isinstance(evaluation, dict):
        scored = evaluation.get("adapter")
        if (Path(scored).resolve() == checkpoint.resolve()) if scored else is_best:
            split = Path(evaluation.get("data_file") or "test").stem
            metrics["test" if split == "test" else f"evaluate_{split}"] = evaluation
    return metrics


def load_samples(run_dir: Path, step: int | None, limit: int) -> list[dict]:
    """Sample generations recorded at `step` (else the latest step before it)."""
    files = sorted((run_dir / "samples").glob("step_*.jsonl"))
    if step is not None:
        files = [f for f in files if f.stem[5:].isdigit() and int(f.stem[5:]) <= step]
    return read_jsonl(files[-1])[:limit] if files and limit else []


def load_export_tokenizer(
    checkpoint: Path, run_dir: Path, base_model: str, trust_remote_code: bool, chat_template: str | None = None
):
    """The run's tokenizer (checkpoint, then best/ and final/, then the base model's); --chat-template replaces
    its template."""
    try:
        for folder in (checkpoint, run_dir / "best", run_dir / "final"):
            if (folder / "tokenizer_config.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
                if chat_template or not tokenizer.chat_template:
                    prepare_chat_template(tokenizer, base_model, chat_template)
                return tokenizer
        return load_tokenizer(base_model, trust_remote_code=trust_remote_code, chat_template=chat_template)
    except ModelLoadError as err:
        sys.exit(f"export.py: error: {err}; cannot export a chat adapter without a usable chat template")


def load_base_generation_config(base_model: str) -> GenerationConfig | None:
    """The base model's generation config if it is available locally (its sampling defaults are kept)."""
    try:
        return GenerationConfig.from_pretrained(resolve_model_path(base_model), local_files_only=True)
    except (OSError, ValueError, ModelLoadError):
        return None


def estimate_export_memory(base_model: str, run_config: dict, adapter_bytes: int, trust_remote_code: bool):
    """Inference memory per base dtype and a note saying how the base was counted."""
    try:
        counts = count_base_parameters(load_config(base_model, trust_remote_code=trust_remote_code))
        note = (
            f"Base: {counts['total']:,} parameters ({counts['quantizable']:,} in the linear layers NF4 quantizes), "
            f"counted from its config; adapter: {adapter_bytes:,} bytes."
        )
    except (OSError, ValueError, ModelLoadError):
        derived = run_config.get("derived", {})
        if "total_params" not in derived:
            return {}, "The base model's size is unknown (config not available and not recorded by the run)."
        total = int(derived["total_params"]) - int(derived.get("trainable_params", 0))
        counts = {"quantizable": total, "other": 0}
        note = f"Base: {total:,} parameters from the run's config.json, all counted as NF4-quantizable (a lower bound)."
    return estimate_inference_memory(counts["quantizable"], counts["other"], adapter_bytes), note


def push_to_hub(folder: Path, repo_id: str, private: bool, commit_message: str) -> str:
    """Create the hub repo if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message))


def resolve_loadable_base(recorded_base: str) -> tuple[str, str | None]:
    """The base to record in the exported adapter_config.json, and how to recreate it elsewhere.

    Plain PEFT (AutoPeftModelForCausalLM, pipeline) loads the base named in adapter_config.json: a hub
    id stays, a local folder becomes absolute, an embedded alias (only this project knows it) its
    converted folder, with the one command that rebuilds that folder on another machine.

    Raises:
        SystemExit: the base cannot be found.
    """
    try:
        loadable_base = resolve_model_path(recorded_base)
    except ModelLoadError as err:
        sys.exit(f"export.py: error: cannot find the base model '{recorded_base}': {err}")
    if Path(loadable_base).exists():
        loadable_base = str(Path(loadable_base).resolve())
    recreate = recreate_command(recorded_base, loadable_base) if recorded_base in EMBEDDED_MODELS else None
    return loadable_base, recreate


def push_export(final_dir: Path, args: argparse.Namespace, secrets: list[str]) -> None:
    """--push-to-hub: upload the published export; a failure leaves the local export intact.

    Raises:
        SystemExit: the upload failed (the reason redacted), with the command to retry.
    """
    try:
        url = push_to_hub(final_dir, args.push_to_hub, args.private, f"Export {args.name} v{args.version}")
    except Exception as err:  # offline, no token, no permission: huggingface_hub raises many types
        reason = redact_secrets(str(err).strip().splitlines()[0] if str(err).strip() else "", secrets)
        sys.exit(
            f"export.py: error: pushing to the hub repo {args.push_to_hub} failed ({type(err).__name__}: {reason}). "
            f"The local export {final_dir} is intact; retry when online with `hf upload {args.push_to_hub} {final_dir}`"
        )
    print(f"pushed {final_dir} -> {url}")


def export_gguf(export_dir: Path, base_dir: str, run_config: dict, args: argparse.Namespace) -> dict:
    """--gguf: merge the adapter, convert it, check every file, write <export>/gguf/ with gguf_check.json.

    Returns:
        The gguf_check.json report.

    Raises:
        SystemExit: conversion or a check failed; the export is then not published (earlier ones stay).
    """
    gguf_dir, stem = export_dir / "gguf", f"{args.name}-v{args.version}"
    gguf_dir.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    eos_ids = GenerationConfig.from_pretrained(export_dir).eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    dataset = run_config.get("dataset", {})
    conversations = load_check_conversations(dataset.get("validation_file"), GGUF_CHECK_PROMPTS)
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    prompt_ids = [tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"] for p in prompts]
    report = {"converter": str(args.converter), "prompts": len(prompts), "max_new_tokens": GGUF_CHECK_NEW_TOKENS}
    try:
        started = time.time()
        with tempfile.TemporaryDirectory(prefix=".merged-", dir=export_dir.parent) as merged_dir:
            merged = build_merged_folder(base_dir, export_dir, tokenizer, nf4_dtype_of(run_config), Path(merged_dir))
            reference = run_reference(merged, prompt_ids, eos_ids, GGUF_CHECK_NEW_TOKENS)
            del merged
            files = convert_to_gguf(args.converter, Path(merged_dir), gguf_dir, stem, args.gguf)
        if args.gguf_lora:
            lora_file = convert_lora_to_gguf(args.converter, export_dir, Path(base_dir), gguf_dir / f"{stem}-lora.gguf")
            report["lora"] = {"file": lora_file.name, "bytes": lora_file.stat().st_size, "base": base_dir}
        if args.quantize:
            source = next(files[t] for t in ("f32", "bf16", "f16") if t in files)
            files[args.quantize] = quantize_gguf(source, gguf_dir / f"{stem}-{args.quantize}.gguf", args.quantize)
        report["convert_s"] = round(time.time() - started, 1)
        with parse_each_gguf_once():
            report["tokenizer"] = check_gguf_tokenizer(files[args.gguf[0]], prompts, tokenizer)
            report["files"] = {t: check_gguf(p, t, prompts, reference, tokenizer, eos_ids) for t, p in files.items()}
        system, source = training_system_prompt(dataset.get("train_file")), files[args.gguf[0]].name
        modelfile = build_modelfile(source, tokenizer, eos_ids, system)
        (gguf_dir / "Modelfile").write_text(modelfile)
        report["modelfile"] = check_modelfile(modelfile, tokenizer, [*conversations, MULTI_TURN_CHECK], system)
        report["modelfile"] |= {"from": source, "stop": tokenizer.convert_ids_to_tokens(eos_ids)}
    except (GGUFError, TemplateError) as err:
        sys.exit(f"export.py: error: --gguf: {err}; nothing was published")
    report["check_s"] = round(time.time() - started - report["convert_s"], 1)
    report["passed"] = not failed_checks(report)
    write_json(gguf_dir / "gguf_check.json", report)
    for gguf_type, result in report["files"].items():
        hf = result["transformers"]
        print(
            f"gguf {gguf_type}: {result['bytes'] / 2**20:.1f} MiB | max |dlogit| {hf['max_abs_logit_diff']:.3g} "
            f"| greedy identical {hf['identical_generations']}/{hf['prompts']} | passed {result['passed']}"
        )
    if not report["passed"]:
        sys.exit(f"export.py: error: GGUF check failed ({'; '.join(failed_checks(report))}); nothing was published")
    return report


def main(argv: list[str] | None = None) -> Path:
    """Export the adapter; returns the published export folder."""
    args = parse_args(argv)
    run_dir = Path(args.run)
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir / "best"
    output_dir = Path(args.output_dir)
    final_dir = output_dir / f"{args.name}-v{args.version}"
    if final_dir.exists() and not args.force:
        sys.exit(f"export.py: error: {final_dir} already exists; choose a new --version, or pass --force to replace it")
    if is_locked(run_dir):  # a live run holds its lock; a stale .lock left by a killed run does not count
        print(f"warning: {run_dir} is locked by a training process; exporting its current files", file=sys.stderr)

    try:  # only a complete checkpoint with finite safetensors weights is exported
        adapter = open_adapter(checkpoint, require_complete=True)
    except CheckpointError as err:
        sys.exit(f"export.py: error: {err}")
    adapter_tensors, adapter_config = adapter.tensors, adapter.config
    run_config = read_json(run_dir / "config.json", missing_ok=True)
    secrets = sorted({*secret_env_values(), *collect_secret_values(run_config)}, key=len, reverse=True)
    base_model = str(run_config.get("args", {}).get("model") or adapter_config["base_model_name_or_path"])
    recorded_base = str(adapter_config.get("base_model_name_or_path") or base_model)
    adapter_config["base_model_name_or_path"], base_recreate = resolve_loadable_base(recorded_base)
    is_best = checkpoint.resolve() == (run_dir / "best").resolve()
    metrics = build_metrics(run_dir, checkpoint, is_best)
    # average_adapters.py's output is no step of the run: the card shows neither its validation nor its samples
    averaged = " + ".join(metrics["checkpoint"].get("averaged_from", []))

    output_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=output_dir))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the published export should be readable like any folder
    try:
        shutil.copyfile(checkpoint / "adapter_model.safetensors", tmp_dir / "adapter_model.safetensors")
        write_json(tmp_dir / "adapter_config.json", redact_secrets(adapter_config, secrets))
        tokenizer = load_export_tokenizer(
            checkpoint, run_dir, recorded_base, args.trust_remote_code, args.chat_template
        )
        tokenizer.save_pretrained(tmp_dir)
        build_generation_config(tokenizer, load_base_generation_config(recorded_base)).save_pretrained(tmp_dir)
        write_json(tmp_dir / "training_args.json", redact_secrets(run_config, secrets))
        write_json(tmp_dir / "metrics.json", redact_secrets(metrics, secrets))
        (tmp_dir / "VERSION").write_text(f"{args.version}\n")
        gguf = export_gguf(tmp_dir, adapter_config["base_model_name_or_path"], run_config, args) if args.gguf else None

        adapter_bytes = sum(t.numel() * t.element_size() for t in adapter_tensors.values())
        memory, memory_note = estimate_export_memory(recorded_base, run_config, adapter_bytes, args.trust_remote_code)
        card = render_model_card(
            CardInputs(
                name=args.name,
                version=args.version,
                base_model=base_model,
                adapter_config=redact_secrets(adapter_config, secrets),
                run_config=redact_secrets(run_config, secrets),
                summary=redact_secrets(read_json(run_dir / "summary.json", missing_ok=True), secrets),
                metrics=redact_secrets(metrics, secrets),
                samples=[]
                if averaged
                else redact_secrets(load_samples(run_dir, metrics["checkpoint"]["step"], args.num_samples), secrets),
                memory=memory,
                memory_note=memory_note,
                base_recreate=base_recreate,
                stop_tokens=tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(tokenizer)),
                gguf=gguf,
                lineage={
                    "run": str(run_dir),
                    "checkpoint": str(checkpoint),
                    **({"averaged_from": averaged} if averaged else {}),
                    "git_commit": run_config.get("git_commit") or "not recorded",
                    "run_created": run_config.get("created") or "not recorded",
                    "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                },
            )
        )
        (tmp_dir / "README.md").write_text(redact_secrets(card, secrets))

        # Last line of defence: nothing unsafe or secret leaves this machine.
        unsafe = [p.name for p in tmp_dir.rglob("*") if p.suffix in UNSAFE_SUFFIXES]
        leaks = find_secrets_in_folder(tmp_dir, secrets)
        if unsafe or leaks:
            sys.exit(
                f"export.py: error: refusing to publish: pickle files {unsafe} or secrets in {[p.name for p in leaks]}"
            )
        publish_folder(tmp_dir, final_dir, overwrite=args.force, complete_marker=False)
    except FileExistsError as err:
        sys.exit(f"export.py: error: {err}; choose a new --version, or pass --force to replace it")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    files = list(final_dir.iterdir())
    size_mb = sum(p.stat().st_size for p in files) / 2**20
    val_ppl = metrics["validation"].get("val_ppl", float("nan"))
    step = metrics["checkpoint"]["step"]
    scored = f"averaged from {averaged}" if averaged else f"step {step}, val_ppl {val_ppl:.4g}"
    print(f"exported {checkpoint} ({scored}) -> {final_dir}")
    print(f"{len(files)} files, {size_mb:.1f} MiB: {', '.join(sorted(p.name for p in files))}")
    if args.push_to_hub:
        push_export(final_dir, args, secrets)
    return final_dir


if __name__ == "__main__":
    main()
