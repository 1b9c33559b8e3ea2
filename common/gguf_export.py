"""GGUF export for llama.cpp / Ollama / LM Studio: convert a merged model, then check the files.

    from common.gguf_export import install_converter, find_converter, convert_to_gguf, check_gguf

Only export.py imports this module. The converter is llama.cpp's own `convert_hf_to_gguf.py` (and
`convert_lora_to_gguf.py`), taken from the pinned PyPI sdist of llama-cpp-python, which vendors
llama.cpp with its converters and its own gguf-py. `install_converter` (`make gguf-setup`) downloads
that one sdist with pip, checks its sha256 and unpacks only the converter files into
`~/.cache/underwrite-lora/llama-cpp-python-<version>/`; nothing is built and no model is downloaded.
The converter runs in a subprocess with the vendored gguf-py first on PYTHONPATH: the PyPI `gguf`
that transformers uses to read GGUF files is older than the one the converter needs.

The checks (`check_gguf`, each gated, numbers kept for gguf_check.json):
- metadata: the GGUF's EOS / end-of-turn ids equal generation_config.json's, the embedded chat
  template equals the export's byte for byte, a BPE pre-tokenizer is one llama.cpp knows;
- tokens: the tokenizer transformers rebuilds from the GGUF encodes the prompts as the export's does;
- logits: transformers loads the GGUF back (de-quantized to float32); max |logit difference| to the
  merged model within `LOGIT_TOLERANCE` (f32 1e-4, f16/bf16 ~0.1; quantized types are measured, not
  gated) and greedy generations identical for f32/f16/bf16/q8_0, or leaving the reference only at a
  near tie: a step where the reference preferred its token by less than the file's measured logit
  error (the step and margin of every divergence are recorded);
- llama.cpp (only where `llama_cpp` is importable): same prompt tokens, same greedy tokens, and it stops
  at the end-of-turn token. Models are loaded without llama.cpp's extra CPU buffer types (weight
  repacking): q8_0/Q4_K_M files crashed in llama_decode with them on an AMX CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# What the converters need from the sdist's vendor/llama.cpp/ (about 2 MB of the 77 MB).
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CONVERTER_ENV = "UNDERWRITE_GGUF_CONVERTER"
SETUP_HINT = "run `make gguf-setup` (downloads the llama-cpp-python sdist once, no build)"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZE_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M"}
# Gated max |logit difference| to the merged float32 model; quantized types are measured only
# (their greedy text is gated). f16 moved the 135M model's logits by 0.04 at most.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 0.1, "bf16": 0.5}
# Greedy text is gated for these; Q4_K_M is measured (4-bit rounding may flip a near tie).
GREEDY_GATED = ("f32", "f16", "bf16", "q8_0")


BUILTIN_CHECK_PROMPTS = [  # when the run's validation file is not available
    [
        {"role": "system", "content": "You are an insurance underwriting assistant."},
        {"role": "user", "content": "Applicant is 34, non-smoker, wants 250k term life. BMI is 23."},
    ]
]


class GGUFError(RuntimeError):
    """The converter is missing or failed, or a GGUF check failed (the message says which and what to do)."""


def converter_dir() -> Path:
    """Where `install_converter` puts the converter: `$UNDERWRITE_GGUF_CONVERTER`, else the user cache."""
    if os.environ.get(CONVERTER_ENV):
        return Path(os.environ[CONVERTER_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "underwrite-lora" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"


def find_converter() -> Path:
    """The installed converter folder.

    Raises:
        GGUFError: not installed (the message says what to run).
    """
    folder = converter_dir()
    if not (folder / "COMPLETE").is_file():
        raise GGUFError(f"llama.cpp's GGUF converter is not installed in {folder}; {SETUP_HINT}")
    return folder


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_converter(target: Path | None = None, sdist: Path | None = None) -> Path:
    """Download the pinned llama-cpp-python sdist (pip, no build), check its sha256, unpack the converters.

    Idempotent, and atomic: files go to a temporary sibling that is renamed into place with a COMPLETE
    marker, so an interrupted setup is simply redone.

    Args:
        target: the converter folder (default `converter_dir()`).
        sdist: an already downloaded sdist to use instead of pip (its sha256 is still checked).

    Returns:
        The converter folder.

    Raises:
        GGUFError: pip failed, or the file's sha256 is not the pinned one.
    """
    target = Path(target or converter_dir())
    if (target / "COMPLETE").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.tmp-", dir=target.parent) as tmp:
        if sdist is None:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python"]
            command += [f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise GGUFError(f"pip could not download llama-cpp-python=={LLAMA_CPP_PYTHON}: {last}")
            sdist = Path(tmp) / SDIST_NAME
        found = sha256_of(sdist)
        if found != SDIST_SHA256:
            raise GGUFError(f"{sdist.name} has sha256 {found}, expected {SDIST_SHA256}; not installing it")
        staging = Path(tmp) / "converter"
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            members = [m for m in members if m.name[len(prefix) :].split("/")[0] in CONVERTER_MEMBERS]
            for member in members:
                member.name = member.name[len(prefix) :]
            archive.extractall(staging, members=members, filter="data")
        (staging / "COMPLETE").write_text(f"{SDIST_NAME} sha256 {SDIST_SHA256}\n")
        if not (target / "COMPLETE").is_file():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    return target


def run_converter(converter: Path, script: str, runs: Sequence[Sequence[str]]) -> None:
    """Run one llama.cpp converter script once per argument list, in one subprocess (one torch import).

    Raises:
        GGUFError: the converter failed; an unknown pre-tokenizer is named as such.
    """
    driver = (
        "import json, runpy, sys\n"
        "script = sys.argv[1]\n"
        "for argv in json.loads(sys.argv[2]):\n"
        "    sys.argv = [script, *argv]\n"
        "    runpy.run_path(script, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)])}
    command = [sys.executable, "-c", driver, str(converter / script), json.dumps([list(r) for r in runs])]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        if "pre-tokenizer was not recognized" in result.stderr or "BPE pre-tokenizer" in result.stderr:
            raise GGUFError(
                "llama.cpp's converter does not recognise this tokenizer's pre-tokenizer, so llama.cpp would "
                "split text differently from transformers; use a base model llama.cpp supports"
            )
        errors = [line for line in result.stderr.strip().splitlines() if "Error" in line or "error" in line]
        last = (errors or result.stderr.strip().splitlines() or ["no output"])[-1]
        raise GGUFError(f"{script} failed: {last}")


def convert_to_gguf(converter: Path, merged_dir: Path, out_dir: Path, stem: str, types: Sequence[str]) -> dict:
    """Convert a merged transformers folder into one GGUF per type (`<stem>-<type>.gguf`).

    Returns:
        {type: path}.

    Raises:
        GGUFError: the converter failed.
    """
    paths = {t: out_dir / f"{stem}-{t}.gguf" for t in types}
    run_converter(
        converter,
        "convert_hf_to_gguf.py",
        [[str(merged_dir), "--outfile", str(p), "--outtype", t] for t, p in paths.items()],
    )
    return paths


def convert_lora_to_gguf(converter: Path, adapter_dir: Path, base_dir: Path, out_file: Path) -> Path:
    """Convert a PEFT adapter into a llama.cpp LoRA GGUF over `base_dir` (f32: adapters are small).

    Raises:
        GGUFError: the converter failed.
    """
    args = [str(adapter_dir), "--base", str(base_dir), "--outfile", str(out_file), "--outtype", "f32"]
    run_converter(converter, "convert_lora_to_gguf.py", [args])
    return out_file


@contextlib.contextmanager
def parse_each_gguf_once():
    """Memoize `gguf.GGUFReader` for the duration: each unchanged file is parsed once.

    The gguf package parses a vocabulary's ~100k strings one numpy element at a time (5 s a file on one
    core), and transformers' config, tokenizer and model loaders each parse the file again (4-5 parses
    a file per check). A file rewritten in between (inode, size or mtime changed) is parsed again.
    """
    import gguf

    original, parsed = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        if mode != "r":
            return original(path, mode)
        stat = os.stat(path)
        key = (os.fspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key not in parsed:
            parsed[key] = original(path, mode)
        return parsed[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def read_gguf_metadata(path: Path) -> dict:
    """The GGUF key/values this module checks (tokens lists left out), read with the gguf package."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    return {key: field.contents() for key, field in reader.fields.items() if key not in skip}


def check_metadata(metadata: dict, chat_template: str, eos_ids: Sequence[int]) -> dict:
    """EOS / end-of-turn ids, chat template and pre-tokenizer of one GGUF against the export.

    Args:
        metadata: from `read_gguf_metadata`.
        chat_template: the export's chat template (chat_template.jinja).
        eos_ids: generation_config.json's eos_token_id(s).

    Returns:
        {"eos_token_id", "eot_token_id", "generation_eos_ids", "end_tokens_match", "chat_template_identical",
        "pre_tokenizer", "pre_tokenizer_recognised", "passed"}.
    """
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    declared = {i for i in (eos, eot) if i is not None}
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    result = {
        "eos_token_id": eos,
        "eot_token_id": eot,
        "generation_eos_ids": list(eos_ids),
        # every id the GGUF declares as an end is one transformers stops at, and the EOS is among them
        "end_tokens_match": eos in eos_ids and declared <= set(eos_ids),
        "chat_template_identical": metadata.get("tokenizer.chat_template") == chat_template,
        "pre_tokenizer": pre,
        # a BPE ("gpt2") vocabulary needs a named pre-tokenizer; "default" means llama.cpp guesses
        "pre_tokenizer_recognised": model != "gpt2" or (pre not in (None, "", "default")),
    }
    result["passed"] = result["end_tokens_match"] and result["chat_template_identical"]
    result["passed"] = result["passed"] and result["pre_tokenizer_recognised"]
    return result


@torch.no_grad()
def run_reference(model, prompt_ids: Sequence[torch.Tensor], eos_ids: Sequence[int], max_new_tokens: int) -> tuple:
    """Per prompt: float32 logits of the prompt, the greedy continuation (token ids, the end token
    included) and the logits of each generated step, shape (steps, vocab)."""
    model.eval()
    logits, generations, step_logits = [], [], []
    for ids in prompt_ids:
        logits.append(model(input_ids=ids).logits.float())
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(eos_ids),
            pad_token_id=eos_ids[0],
            output_logits=True,
            return_dict_in_generate=True,
        )
        generations.append(output.sequences[0, ids.shape[1] :].tolist())
        step_logits.append(torch.cat(output.logits).float())
    return logits, generations, step_logits


def first_divergence(reference: list[int], candidate: list[int], step_logits: torch.Tensor) -> dict:
    """Where a greedy generation leaves the reference, and by how much the reference preferred its token there.

    Returns:
        {"step", "margin"}: the first differing step and logit(reference token) - logit(candidate token)
        under the reference model (inf when one generation is a prefix of the other).
    """
    step = next((i for i, (a, b) in enumerate(zip(reference, candidate, strict=False)) if a != b), None)
    if step is None:
        return {"step": min(len(reference), len(candidate)), "margin": float("inf")}
    margin = (step_logits[step, reference[step]] - step_logits[step, candidate[step]]).item()
    return {"step": step, "margin": margin}


def check_with_transformers(
    path: Path, prompts: Sequence[str], reference: tuple, tokenizer, eos_ids, gguf_type
) -> dict:
    """Load a GGUF back with transformers (de-quantized to float32); compare logits and greedy text with the merged model.

    Args:
        path: the GGUF file.
        prompts: the rendered prompts (chat template applied, generation prompt added).
        reference: `run_reference` of the merged model on the export tokenizer's ids of `prompts`.
        tokenizer: the export's tokenizer.
        eos_ids: the end-of-turn ids.
        gguf_type: f32, f16, bf16, q8_0 or a llama.cpp quantization name (decides what is gated).

    Returns:
        {"max_abs_logit_diff", "mean_abs_logit_diff", "tolerance", "identical_generations", "prompts",
        "generated_tokens", "divergences" (`first_divergence` of each differing generation),
        "near_tie_divergences", "passed"}. Greedy text passes when every generation is identical or leaves
        the reference at a near tie (margin <= this file's max |logit difference|).
    """
    from transformers import AutoModelForCausalLM

    expected_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    max_new_tokens = max(len(g) for g in reference[1])
    prompt_ids = [torch.tensor([ids]) for ids in expected_ids]
    logits, generations, _ = run_reference(model, prompt_ids, eos_ids, max_new_tokens)
    diffs = [(a - b).abs() for a, b in zip(reference[0], logits, strict=True)]
    tolerance = LOGIT_TOLERANCE.get(gguf_type)
    pairs = list(zip(reference[1], generations, reference[2], strict=True))
    result = {
        "max_abs_logit_diff": max(d.max().item() for d in diffs),
        "mean_abs_logit_diff": sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs),
        "tolerance": tolerance,
        "identical_generations": sum(a == b for a, b, _ in pairs),
        "prompts": len(prompts),
        "generated_tokens": [len(a) for a, _, _ in pairs],
        "divergences": [first_divergence(a, b, s) for a, b, s in pairs if a != b],
    }
    # A divergence is a near tie when the reference preferred its token by less than the logit error
    # this file shows on the prompts: rounding noise, not a broken file (those diverge by whole logits).
    result["near_tie_divergences"] = sum(d["margin"] <= result["max_abs_logit_diff"] for d in result["divergences"])
    logits_ok = tolerance is None or result["max_abs_logit_diff"] <= tolerance
    explained = result["identical_generations"] + result["near_tie_divergences"]
    greedy_ok = gguf_type not in GREEDY_GATED or explained == result["prompts"]
    result["passed"] = logits_ok and greedy_ok
    return result


def check_gguf_tokenizer(path: Path, prompts: Sequence[str], tokenizer) -> dict:
    """Whether the tokenizer transformers rebuilds from a GGUF's vocabulary encodes the prompts as the export's.

    The converter writes the same vocabulary into every type, so one file is checked (it takes ~10 s).

    Returns:
        {"file", "prompts", "tokens_identical"}.
    """
    from transformers import AutoTokenizer

    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    identical = all(
        gguf_tokenizer(p, add_special_tokens=False)["input_ids"] == tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in prompts
    )
    return {"file": path.name, "prompts": len(prompts), "tokens_identical": identical}


@contextlib.contextmanager
def without_extra_buffer_types(llama_cpp_module):
    """Make `llama_cpp.Llama` load models with `use_extra_bufts=False` (no CPU weight repacking).

    `Llama.__init__` builds its model parameters from `llama_model_default_params()` and loads at once,
    with no argument for this field, so the default is replaced for the duration of the load.
    """
    original = llama_cpp_module.llama_cpp.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp_module.llama_cpp.llama_model_default_params = default_params
    try:
        yield
    finally:
        llama_cpp_module.llama_cpp.llama_model_default_params = original


def load_llama_cpp(path: Path, n_ctx: int = 2048):
    """A `llama_cpp.Llama` on one thread, without extra buffer types (see `without_extra_buffer_types`)."""
    import llama_cpp

    with without_extra_buffer_types(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, verbose=False)


def check_with_llama_cpp(
    path: Path, prompts: Sequence[str], reference: tuple, tokenizer, eos_ids, noise: float
) -> dict:
    """Greedy text of llama.cpp (llama-cpp-python) against the merged model, and that it stops at the end.

    Args:
        path, prompts, reference, tokenizer, eos_ids: as for `check_with_transformers`.
        noise: the file's max |logit difference| measured with transformers (the near-tie threshold).

    Returns:
        {"tokens_identical", "identical_generations", "divergences", "near_tie_divergences",
        "stopped_at_end_of_turn", "expected_stops", "prompts", "use_extra_bufts", "passed"}; it passes when
        the prompt tokens are identical and every generation is identical (so it stops where transformers
        stops) or leaves the reference at a near tie.
    """
    llm = load_llama_cpp(path)
    tokens_identical, identical, stopped, expected_stops, divergences = True, 0, 0, 0, []
    for prompt, expected, step_logits in zip(prompts, reference[1], reference[2], strict=True):
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        tokens_identical &= ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        llm.reset()
        generated = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            generated.append(token)
            if token in eos_ids or len(generated) >= len(expected):
                break
        identical += generated == expected
        divergences += [first_divergence(expected, generated, step_logits)] if generated != expected else []
        expected_stops += expected[-1] in eos_ids
        stopped += generated[-1] in eos_ids
    near_ties = sum(d["margin"] <= noise for d in divergences)
    result = {
        "tokens_identical": tokens_identical,
        "identical_generations": identical,
        "divergences": divergences,
        "near_tie_divergences": near_ties,
        "stopped_at_end_of_turn": stopped,
        "expected_stops": expected_stops,
        "prompts": len(prompts),
        "use_extra_bufts": bool(llm.model_params.use_extra_bufts),
    }
    result["passed"] = tokens_identical and identical + near_ties == len(prompts)
    return result


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed (its check and --quantize need it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def quantize_gguf(source: Path, target: Path, quant_type: str) -> Path:
    """Quantize a f32/f16 GGUF with llama.cpp (`llama_model_quantize`), e.g. to Q4_K_M.

    Raises:
        GGUFError: llama-cpp-python is missing or the quantization failed.
    """
    if not llama_cpp_available():
        raise GGUFError(f"--quantize needs llama-cpp-python: pip install llama-cpp-python=={LLAMA_CPP_PYTHON}")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZE_TYPES[quant_type])
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise GGUFError(f"llama.cpp could not quantize {source.name} to {quant_type}")
    return target


def load_check_conversations(validation_file: str | None, limit: int) -> list[list[dict]]:
    """Prompts for the checks: each validation record's turns before its last assistant reply.

    Args:
        validation_file: the run's validation JSONL (its config.json's dataset.validation_file), or None.
        limit: how many records to use.

    Returns:
        Message lists ending with a user turn (`BUILTIN_CHECK_PROMPTS` when the file is not there).
    """
    from common.data import DataError, load_records

    path = Path(validation_file or "")
    try:
        records = load_records(path) if validation_file and path.is_file() else []
    except DataError:
        records = []
    conversations = []
    for record in records[:limit]:
        last = max(i for i, m in enumerate(record["messages"]) if m["role"] == "assistant")
        conversations.append(record["messages"][:last])
    return conversations or [list(c) for c in BUILTIN_CHECK_PROMPTS]


def nf4_dtype_of(run_config: dict) -> torch.dtype | None:
    """The dtype a QLoRA run loaded (and so NF4-quantized) its base in; None for a LoRA run.

    The same rule as merge_and_load.py: `derived.base_dtype`, else the run's mixed precision.
    """
    if (run_config.get("args", {}).get("quantization") or "none") != "nf4":
        return None
    derived = run_config.get("derived", {})
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if derived.get("base_dtype") in names:
        return names[derived["base_dtype"]]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(derived.get("mixed_precision"), torch.float32)


def build_merged_folder(base_dir: str, adapter_dir: Path, tokenizer, nf4_dtype: torch.dtype | None, out_dir: Path):
    """Merge the adapter into its float32 base (NF4-rounded first for QLoRA) and save it for the converter.

    Args:
        base_dir: the base folder or hub id recorded in the export's adapter_config.json.
        adapter_dir: the export folder (adapter, tokenizer, generation_config.json).
        tokenizer: the export's tokenizer, saved with the merged weights.
        nf4_dtype: `nf4_dtype_of(run_config)`.
        out_dir: the (temporary) folder to write.

    Returns:
        The merged model (float32, eval mode), the same weights as the saved folder.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    from common.artifacts import round_trip_nf4

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if nf4_dtype is not None:
        round_trip_nf4(model, nf4_dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    GenerationConfig.from_pretrained(adapter_dir).save_pretrained(out_dir)
    return merged


def check_gguf(path: Path, gguf_type: str, prompts: Sequence[str], reference: tuple, tokenizer, eos_ids) -> dict:
    """Every check of one GGUF file: metadata, transformers round trip, llama.cpp (if installed).

    Args:
        path: the GGUF file.
        gguf_type: its type (f16, q8_0, Q4_K_M, ...).
        prompts: the rendered check prompts.
        reference: `run_reference` of the merged model on them.
        tokenizer: the export's tokenizer (its chat template is the one to find in the GGUF).
        eos_ids: generation_config.json's end ids.

    Returns:
        {"file", "bytes", "metadata", "transformers", "llama_cpp" (or a reason it was skipped), "passed"}.
    """
    result = {"file": path.name, "bytes": path.stat().st_size}
    result["metadata"] = check_metadata(read_gguf_metadata(path), tokenizer.chat_template, eos_ids)
    result["transformers"] = check_with_transformers(path, prompts, reference, tokenizer, eos_ids, gguf_type)
    passed = result["metadata"]["passed"] and result["transformers"]["passed"]
    if llama_cpp_available():
        noise = result["transformers"]["max_abs_logit_diff"]
        result["llama_cpp"] = check_with_llama_cpp(path, prompts, reference, tokenizer, eos_ids, noise)
        passed = passed and result["llama_cpp"]["passed"]
    else:
        result["llama_cpp"] = "skipped: llama-cpp-python is not installed"
    result["passed"] = passed
    return result


def failed_checks(report: dict) -> list[str]:
    """One phrase per failed check of a gguf_check.json report, e.g. "q8_0: greedy text 2/3"."""
    reasons = []
    for gguf_type, result in report.get("files", {}).items():
        meta, hf = result["metadata"], result["transformers"]
        reasons += [f"{gguf_type}: EOS {meta['eos_token_id']} vs {meta['generation_eos_ids']}"] * (
            not meta["end_tokens_match"]
        )
        reasons += [f"{gguf_type}: chat template differs"] * (not meta["chat_template_identical"])
        reasons += [f"{gguf_type}: pre-tokenizer {meta['pre_tokenizer']!r}"] * (not meta["pre_tokenizer_recognised"])
        if hf["tolerance"] is not None and hf["max_abs_logit_diff"] > hf["tolerance"]:
            reasons.append(f"{gguf_type}: max |dlogit| {hf['max_abs_logit_diff']:.3g} > {hf['tolerance']:g}")
        if gguf_type in GREEDY_GATED and hf["identical_generations"] + hf["near_tie_divergences"] < hf["prompts"]:
            steps = ", ".join(f"step {d['step']} by {d['margin']:.3g}" for d in hf["divergences"])
            reasons.append(
                f"{gguf_type}: greedy text identical {hf['identical_generations']}/{hf['prompts']} ({steps})"
            )
        if isinstance(result.get("llama_cpp"), dict) and not result["llama_cpp"]["passed"]:
            reasons.append(f"{gguf_type}: llama.cpp {result['llama_cpp']}")
    if "tokenizer" in report and not report["tokenizer"]["tokens_identical"]:
        reasons.append(f"the tokenizer rebuilt from {report['tokenizer']['file']} encodes the prompts differently")
    if "modelfile" in report and not report["modelfile"]["passed"]:
        reasons.append(f"Modelfile TEMPLATE renders {report['modelfile']['mismatches']} conversation(s) differently")
    return reasons
