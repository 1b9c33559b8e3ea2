"""Merge a LoRA/QLoRA adapter into its base model, check parity, and save a plain transformers model.

    python merge_and_load.py --adapter exports/demo-v1.0                  # -> merged/demo-v1.0/
    python merge_and_load.py --adapter runs/demo/best --output merged/demo --force
    python merge_and_load.py --adapter exports/demo-v1.0 --no-verify      # skip the parity check
    python merge_and_load.py --load-only merged/demo-v1.0 --prompt "Applicant is 52, smoker, wants 1M term life."

The merged folder is an ordinary transformers model (model.safetensors, config, tokenizer with its
chat template, generation_config.json that stops at the end-of-turn token, merge_info.json). It needs
neither PEFT nor this repository:

    from transformers import pipeline
    chat = pipeline("text-generation", model="merged/demo-v1.0")
    chat([{"role": "user", "content": "Applicant is 52, smoker, wants 1M term life."}], max_new_tokens=128)

How the merge works
- The base recorded in adapter_config.json (alias, folder or hub id; `--base-model` overrides) is loaded
  in float32 with `common.model.load_model_and_tokenizer`; PEFT applies the adapter and `merge_and_unload`
  folds it into the weights (W + alpha/r * B @ A). The merged model is saved in float32.
- QLoRA adapters (the run's config says `quantization: nf4`): the adapter was trained against the
  NF4-rounded base, not the float one. So the float base is first rounded the same way (bitsandbytes
  quantize -> dequantize, NF4, blocksize 64, double quantization, from the dtype the run loaded the base
  in: bf16/fp16 per the run's mixed precision, else fp32, as train.py does). The merged model then holds
  exactly the weights the adapter saw, de-quantized, plus the adapter: a float32 model (4 bytes per
  weight instead of NF4's ~0.52; quantize it again at load time to get the memory back).

Parity check (on by default; `--no-verify` skips it)
- On `--num-prompts` validation prompts: the adapter model (PEFT, unmerged, on the same base as the
  merge) vs the merged folder reloaded from disk with plain transformers. Max |logit difference| must be
  <= `--atol` (default 1e-3; float32 merges differ by ~1e-6, from summation order) and greedy generations
  of `--max-new-tokens` tokens must be identical. On a mismatch nothing is published and the exit status is 1.
  The forwards run in fp32 (`--dtype`; `auto` = the dtype common/precision.py measures fastest here,
  which needs a larger --atol: bf16 rounding alone moves the 135M model's logits by ~0.1).
- QLoRA: the gated comparison above uses the de-quantized base (the like-for-like check of the merge). A
  second line compares the merged model with the adapter on the real NF4 base (4-bit matmuls in the run's
  compute dtype); it is printed for information, not gated, because it measures bf16/fp16 compute noise,
  not merge errors.
- Measured (3 validation prompts, 16 greedy tokens, CPU):
    tiny 2-layer test model     LoRA max |dlogit| 3.9e-7;  QLoRA 3.9e-7, NF4 reference 5.6e-3 (3/3 greedy)
    SmolLM2-135M-Instruct       LoRA max |dlogit| 7.2e-5;  QLoRA 1.1e-4, NF4 reference 1.8 (mean 0.14, 2/3 greedy)
  The 135M NF4 reference equals the plain base run in bf16 instead of fp32 (max 1.8, mean 0.14, logits up
  to ~40): it is bf16 noise, not a merge error. For multi-billion-parameter bases raise --atol if needed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase, pipeline

from common.artifacts import (
    build_generation_config,
    open_adapter,
    precision_autocast,
    round_trip_nf4,
    saved_chat_template,
)
from common.checkpoint import CheckpointError, publish_folder
from common.data import DataError, load_records
from common.jsonio import read_json, write_json
from common.model import ModelLoadError, load_model_and_tokenizer
from common.precision import PrecisionChoice, resolve_precision

BUILTIN_PROMPTS = [
    "Applicant is 34, non-smoker, wants 250k term life. BMI is 23.",
    "Applicant is 58, smoker, history of hypertension, wants 1M term life.",
    "Small bakery wants general liability cover; 6 employees, no claims in 5 years.",
]
SYSTEM_PROMPT = "You are an insurance underwriting assistant."
NF4_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Merge an adapter into its base and check parity.")
    # --- what to merge ---
    parser.add_argument("--adapter", help="adapter folder: an export (exports/<name>-vX.Y) or runs/<run>/best")
    parser.add_argument("--output", help="merged model folder (default: merged/<adapter folder name>)")
    parser.add_argument("--base-model", help="base to merge into (default: adapter_config.json's base)")
    parser.add_argument(
        "--base-quantization", choices=["auto", "nf4", "none"], default="auto", help="auto: read the run's config"
    )
    parser.add_argument(
        "--nf4-dtype", choices=["auto", *NF4_DTYPES], default="auto", help="dtype the QLoRA run quantized from"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder")
    # --- parity check ---
    parser.add_argument("--no-verify", action="store_true", help="skip the merged-vs-adapter parity check")
    parser.add_argument("--atol", type=float, default=1e-3, help="max allowed |logit difference|")
    dtypes = ["fp32", "auto", "bf16", "fp16"]
    dtype_help = "autocast dtype of the parity forwards (auto: the fastest measured here; raise --atol)"
    parser.add_argument("--dtype", default="fp32", choices=dtypes, help=dtype_help)
    parser.add_argument("--num-prompts", type=int, default=3, help="validation prompts used for parity")
    parser.add_argument("--data-file", default="data/validation.jsonl", help="prompts (built-in ones if missing)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="greedy tokens per prompt (default 16; 128 with --load-only)"
    )
    # --- load only ---
    parser.add_argument("--load-only", metavar="PATH", help="load a merged folder and answer --prompt; no merge")
    parser.add_argument("--prompt", default=BUILTIN_PROMPTS[0], help="user message for --load-only")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    parser.add_argument("--chat-template", metavar="FILE", help="Jinja chat template (default: the adapter's own)")
    args = parser.parse_args(argv)

    if bool(args.adapter) == bool(args.load_only):
        parser.error("pass exactly one of --adapter (merge) or --load-only PATH (load a merged folder)")
    if args.max_new_tokens is None:
        args.max_new_tokens = 128 if args.load_only else 16
    if args.load_only:
        if not (Path(args.load_only) / "config.json").is_file():
            parser.error(f"--load-only {args.load_only}: no config.json; pass a folder written by this script")
        return args
    adapter = Path(args.adapter)
    args.output = args.output or str(Path("merged") / adapter.resolve().name)
    if Path(args.output).exists() and not args.force:
        parser.error(f"--output {args.output} already exists; pass --force to replace it")
    if args.atol < 0 or args.num_prompts < 1 or args.max_new_tokens < 1:
        parser.error("--atol must be >= 0, --num-prompts and --max-new-tokens >= 1")
    return args


def read_training_config(adapter_dir: Path) -> dict:
    """The run's resolved config: an export's training_args.json, else the run's config.json."""
    for path in (adapter_dir / "training_args.json", adapter_dir / "config.json", adapter_dir.parent / "config.json"):
        if path.is_file():
            data = read_json(path)
            if isinstance(data, dict) and "args" in data:
                return data
    return {}


def resolve_nf4_dtype(flag: str, training_config: dict) -> torch.dtype:
    """The dtype the QLoRA run loaded (and so quantized) its base in: what the run recorded, not a new choice.

    train.py records the frozen base's dtype (`derived.base_dtype`, the dtype common.precision chose);
    older runs only recorded `derived.mixed_precision`, from which train.py derived it.
    """
    if flag != "auto":
        return NF4_DTYPES[flag]
    derived = training_config.get("derived", {})
    if derived.get("base_dtype") in NF4_DTYPES:
        return NF4_DTYPES[derived["base_dtype"]]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(derived.get("mixed_precision"), torch.float32)


def build_prompts(data_file: Path, num_prompts: int) -> list[list[dict]]:
    """Chat prompts: each record's turns before its last assistant reply (built-in prompts if no file)."""
    if not data_file.is_file():
        print(f"{data_file} not found: using {min(num_prompts, len(BUILTIN_PROMPTS))} built-in prompts")
        return [
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": text}]
            for text in BUILTIN_PROMPTS[:num_prompts]
        ]
    prompts = []
    for record in load_records(data_file):
        if "messages" in record and len(prompts) < num_prompts:
            last = max(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")
            prompts.append(record["messages"][:last])
    if not prompts:
        sys.exit(
            f"merge_and_load.py: error: {data_file} has no chat records to build parity prompts from; pass another --data-file"
        )
    return prompts


@torch.no_grad()
def run_prompts(
    model, prompt_ids: list[torch.Tensor], max_new_tokens: int, eos_ids: list[int], precision: PrecisionChoice
) -> tuple[list, list]:
    """Per prompt: float32 logits of the prompt (one forward, no padding) and the greedy continuation,
    under `precision`'s autocast (none for fp32)."""
    model.eval()
    logits, generations = [], []
    for ids in prompt_ids:
        with precision_autocast(precision):
            logits.append(model(input_ids=ids).logits.float())
            output = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos_ids,
                pad_token_id=eos_ids[0],
            )
        generations.append(output[0, ids.shape[1] :].tolist())
    return logits, generations


def compare(reference: tuple[list, list], candidate: tuple[list, list]) -> dict:
    """Max/mean |logit difference| and how many greedy generations are identical."""
    diffs = [(a - b).abs() for a, b in zip(reference[0], candidate[0], strict=True)]
    return {
        "max_abs_logit_diff": max(d.max().item() for d in diffs),
        "mean_abs_logit_diff": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
        "positions": sum(d.shape[1] for d in diffs),
        "identical_generations": sum(a == b for a, b in zip(reference[1], candidate[1], strict=True)),
        "prompts": len(diffs),
    }


def format_parity(label: str, result: dict, atol: float | None) -> str:
    """One printed line per comparison."""
    limit = f" (tolerance {atol:.0e})" if atol is not None else ""
    return (
        f"{label}: max |dlogit| {result['max_abs_logit_diff']:.3e}{limit}, mean {result['mean_abs_logit_diff']:.3e} "
        f"over {result['positions']} positions | greedy generations identical "
        f"{result['identical_generations']}/{result['prompts']}"
    )


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapter into the base weights and return the plain transformers model."""
    return model.merge_and_unload()


def load_merged(path: str | Path, trust_remote_code: bool = False, dtype: str | torch.dtype = "auto"):
    """Load a merged folder with plain transformers (no PEFT, no repository code needed).

    Args:
        path: a folder written by this script.
        trust_remote_code: allow custom model code (off by default).
        dtype: "auto" keeps the saved dtype (float32); pass torch.bfloat16 to halve the memory.

    Returns:
        (model in eval mode, tokenizer with its chat template).
    """
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def generate_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Answer one user message through `transformers.pipeline("text-generation")` and the chat template."""
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
    output = chat(messages, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0]["generated_text"][-1]["content"]


def check_parity(
    tmp_dir: Path, adapter_outputs, prompt_ids, eos_ids, precision, args, nf4_base: tuple[str, torch.dtype] | None
) -> dict:
    """Reload the merged model from disk with plain transformers and compare it with the adapter; for a QLoRA
    adapter also run it on the real NF4 base (`nf4_base`: the base's name and the NF4 compute dtype).

    Returns:
        {"parity": ...} (and, for a QLoRA adapter, the ungated "nf4_reference" on the real NF4 base).

    Raises:
        SystemExit: the logits differ by more than --atol or a greedy generation differs.
    """
    info = {}
    reloaded, _ = load_merged(tmp_dir, trust_remote_code=args.trust_remote_code, dtype=torch.float32)
    merged_outputs = run_prompts(reloaded, prompt_ids, args.max_new_tokens, eos_ids, precision)
    del reloaded
    parity = compare(adapter_outputs, merged_outputs)
    parity["atol"] = args.atol
    parity["passed"] = (
        parity["max_abs_logit_diff"] <= args.atol and parity["identical_generations"] == parity["prompts"]
    )
    info["parity"] = parity
    print(format_parity("parity (adapter vs merged, reloaded from disk)", parity, args.atol))
    if nf4_base is not None:
        nf4_model, _ = load_model_and_tokenizer(
            nf4_base[0], quantization="nf4", dtype=nf4_base[1], trust_remote_code=args.trust_remote_code
        )
        from peft import PeftModel  # here, after common/: see main()

        nf4_model = PeftModel.from_pretrained(nf4_model, str(Path(args.adapter)))
        outputs = run_prompts(nf4_model, prompt_ids, args.max_new_tokens, eos_ids, precision)
        info["nf4_reference"] = compare(outputs, merged_outputs)
        title = "reference, not gated (adapter on the real NF4 base vs merged)"
        print(format_parity(title, info["nf4_reference"], None))
        del nf4_model
    if not parity["passed"]:
        reasons = []
        if parity["max_abs_logit_diff"] > args.atol:
            reasons.append(f"max |dlogit| {parity['max_abs_logit_diff']:.3e} > {args.atol:.0e}")
        if parity["identical_generations"] < parity["prompts"]:
            reasons.append(f"{parity['prompts'] - parity['identical_generations']} greedy generation(s) differ")
        sys.exit(
            f"merge_and_load.py: error: parity check failed ({'; '.join(reasons)}); {Path(args.output)} was not written"
        )
    return info


def load_base_for_merge(
    base_name: str, adapter_dir: Path, chat_template_file: str | None, trust_remote_code: bool
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load the base in float32 with the tokenizer the adapter was trained with.

    Args:
        base_name: alias, folder or hub id of the base.
        adapter_dir: the adapter folder (its saved chat template and tokenizer files win).
        chat_template_file: `--chat-template FILE`, or None for the adapter's own template.
        trust_remote_code: allow custom model code from the hub.

    Returns:
        (float32 base model, tokenizer with the chat template).

    Raises:
        SystemExit: the base cannot be loaded.
    """
    try:
        # --chat-template FILE, else the template the adapter was trained with (saved next to it)
        chat_template = chat_template_file or saved_chat_template(adapter_dir)
        model, tokenizer = load_model_and_tokenizer(
            base_name,
            quantization=None,
            dtype=torch.float32,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
        )
    except ModelLoadError as err:
        sys.exit(f"merge_and_load.py: error: cannot load the base model '{base_name}': {err}; pass --base-model")
    if (adapter_dir / "tokenizer_config.json").is_file():  # the exported tokenizer wins, with the template above
        template = tokenizer.chat_template
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
        tokenizer.chat_template = template
    return model, tokenizer


def main(argv: list[str] | None = None) -> dict:
    """Merge (or, with --load-only, load and generate); returns what was written to merge_info.json."""
    args = parse_args(argv)
    if args.load_only:
        model, tokenizer = load_merged(args.load_only, trust_remote_code=args.trust_remote_code)
        reply = generate_reply(model, tokenizer, args.prompt, args.max_new_tokens)
        print(reply)
        return {"reply": reply}

    adapter_dir, output_dir = Path(args.adapter), Path(args.output)
    try:  # the one check of an adapter folder that evaluate.py and export.py use too
        adapter = open_adapter(adapter_dir)
    except CheckpointError as err:
        sys.exit(f"merge_and_load.py: error: {err}")
    training_config = read_training_config(adapter_dir)
    base_name = args.base_model or adapter.base_model
    quantization = args.base_quantization
    if quantization == "auto":
        quantization = training_config.get("args", {}).get("quantization") or "none"

    # --- the base exactly as the adapter saw it, in full precision ---
    model, tokenizer = load_base_for_merge(base_name, adapter_dir, args.chat_template, args.trust_remote_code)
    nf4_dtype = resolve_nf4_dtype(args.nf4_dtype, training_config) if quantization == "nf4" else None
    if nf4_dtype is not None:
        rounded = round_trip_nf4(model, nf4_dtype)
        print(f"QLoRA adapter: {rounded} linear layers rounded through NF4 ({nf4_dtype}) before merging")
    generation_config = (
        GenerationConfig.from_pretrained(adapter_dir)
        if (adapter_dir / "generation_config.json").is_file()
        else build_generation_config(tokenizer, model.generation_config)
    )
    eos_ids = generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    # The parity forwards' dtype comes from the one rule (common/precision.py); fp32 by default, so the
    # gate compares the merge itself, not bf16/fp16 rounding noise (~0.1 logits on the 135M model).
    precision = resolve_precision(args.dtype, torch.device("cpu"), model.config, measure_peak=False)
    from peft import PeftModel  # here, after common/, whose __init__ quiets a bitsandbytes warning at import

    model = PeftModel.from_pretrained(model, str(adapter_dir))

    prompt_ids = []
    if not args.no_verify:
        try:
            prompts = build_prompts(Path(args.data_file), args.num_prompts)
        except DataError as err:
            sys.exit(f"merge_and_load.py: error: {err}")
        for messages in prompts:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids.append(tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"])
        adapter_outputs = run_prompts(model, prompt_ids, args.max_new_tokens, eos_ids, precision)

    # --- merge and save to a temporary sibling folder; published only if parity holds ---
    merged = merge_adapter(model)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private; the published folder should be readable like any folder
    try:
        merged.save_pretrained(tmp_dir)  # safetensors
        tokenizer.save_pretrained(tmp_dir)
        generation_config.save_pretrained(tmp_dir)
        del model, merged
        info = {
            "adapter": str(adapter_dir),
            "base_model": base_name,
            "base_quantization": quantization,
            "nf4_dtype": str(nf4_dtype).replace("torch.", "") if nf4_dtype else None,
            "saved_dtype": "float32",
            "parity_precision": precision.to_json(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if not args.no_verify:  # published only if the merged model, reloaded from disk, matches the adapter
            nf4_base = (base_name, nf4_dtype) if nf4_dtype is not None else None
            info |= check_parity(tmp_dir, adapter_outputs, prompt_ids, eos_ids, precision, args, nf4_base)
        write_json(tmp_dir / "merge_info.json", info)
        publish_folder(tmp_dir, output_dir, overwrite=args.force, complete_marker=False)
    except FileExistsError as err:
        sys.exit(f"merge_and_load.py: error: {err}; pass --force to replace it")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"merged {adapter_dir} into {base_name} -> {output_dir}")
    return info


if __name__ == "__main__":
    main()
