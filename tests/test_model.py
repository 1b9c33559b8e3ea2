"""common.model and common.embedded_model: the default's GGUF -> cached HF folder, hub ids offline, 4-bit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from common import embedded_model
from common import model as model_lib
from common.model import DEFAULT_MODEL, ModelLoadError, load_model_and_tokenizer, resolve_model_path
from tests.conftest import REPO

PROMPT = [
    {"role": "system", "content": "You are an insurance underwriting assistant."},
    {"role": "user", "content": "Homeowners, frame house, roof 22 years old. Approve?"},
]


@pytest.fixture(scope="module")
def default_model():
    return load_model_and_tokenizer(DEFAULT_MODEL)


def test_cached_folder_matches_the_gguf_logits(default_model):
    from transformers import AutoModelForCausalLM

    model, tokenizer = default_model
    gguf = embedded_model.find_embedded_gguf(DEFAULT_MODEL)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        cached_logits = model(**ids).logits
        direct_logits = direct(**ids).logits
    torch.testing.assert_close(cached_logits, direct_logits, atol=1e-4, rtol=1e-4)
    assert cached_logits.shape[-1] == 49152
    assert "quantization_config" not in model.config.to_dict()  # a plain model: save_pretrained works


def test_tokenizer_round_trips_the_chat_template(default_model):
    _, tokenizer = default_model
    messages = [*PROMPT, {"role": "assistant", "content": "Refer: roof age over 20 on frame.\nDECISION: refer"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are an insurance underwriting assistant.<|im_end|>\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None


def test_default_model_generates_and_stops_at_end_of_turn(default_model):
    model, tokenizer = default_model
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert "Paris" in reply and reply.endswith("<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_nf4_loading_on_cpu_quantizes_linear_layers():
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL, quantization="nf4", dtype=torch.bfloat16)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit"
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization of the absmax constants
    ids = tokenizer("Underwriting", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv(model_lib.CACHE_ENV, str(tmp_path / "cache"))
    target = tmp_path / "cache" / DEFAULT_MODEL

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption while saving")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        embedded_model.main([])
    assert not target.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written temp folder left behind
    monkeypatch.undo()
    monkeypatch.setenv(model_lib.CACHE_ENV, str(tmp_path / "cache"))
    assert embedded_model.main([]) == target
    assert resolve_model_path(DEFAULT_MODEL) == str(target)  # what every script loads from now on
    assert (target / "model.safetensors").is_file() and (target / "chat_template.jinja").is_file()
    mtime = (target / "model.safetensors").stat().st_mtime
    assert embedded_model.convert_embedded_model(DEFAULT_MODEL) == target  # a second call reuses the folder
    assert (target / "model.safetensors").stat().st_mtime == mtime


def test_train_never_converts_and_names_the_setup_command(tmp_path):
    """An alias not converted yet: train.py exits at once with the command to run, without a hub call."""
    code = (
        "import socket, sys, train\n"
        "def refuse(*args, **kwargs): raise AssertionError('network call')\n"
        "socket.create_connection = socket.socket.connect = refuse\n"
        "try:\n"
        "    train.main(['--output-dir', sys.argv[1], '--report-to', 'none'])\n"
        "except SystemExit as stop:\n"
        "    print(stop.code)\n"
        "print('common.embedded_model' in sys.modules)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), model_lib.CACHE_ENV: str(tmp_path / "empty-cache")}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    missing = tmp_path / "empty-cache" / DEFAULT_MODEL
    assert result.stdout.splitlines()[-2:] == [
        f"error: model '{DEFAULT_MODEL}' is not converted yet ({missing} is missing): run `make setup`, or "
        f"`python -m common.embedded_model {DEFAULT_MODEL}` in this project's folder",
        "False",  # train.py's closure never imports the conversion
    ]
    assert not (tmp_path / "run").exists()


def test_unknown_hub_id_offline_fails_fast_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as excinfo:
        load_model_and_tokenizer("some-org/not-cached-model")
    message = str(excinfo.value)
    assert "not in the local Hugging Face cache" in message and "\n" not in message
    assert DEFAULT_MODEL in message


def test_missing_local_folder_is_reported():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./no/such/model")
