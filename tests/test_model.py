"""common.model and common.embedded_model: the default's GGUF -> cached HF folder, hub ids offline, 4-bit."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from common import embedded_model
from common import model as model_lib
from common.model import DEFAULT_MODEL, ModelLoadError, load_model_and_tokenizer, resolve_model_path
from tests.conftest import REPO

PROMPT = [
    {"role": "system", "content": "You are an insurance underwriting assistant."},
    {"role": "user", "content": "Homeowners, frame house, roof 22 years old. Approve?"},
]


# A tiny GGUF shaped like the embedded one: llama architecture, a byte-level BPE ("gpt2") vocabulary
# with ChatML control tokens, tied embeddings, a Q8_0 embedding. 2 layers of hidden 64, 4 heads, 2 kv heads.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
MERGES = ["h e", "t he", "Ġ he"]  # "the" and " he" become one token each
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
GGUF_LINEARS = {  # GGUF name: (HF name, out, in)
    "attn_q": ("self_attn.q_proj", HEADS * HEAD_DIM, HIDDEN),
    "attn_k": ("self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_v": ("self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN),
    "attn_output": ("self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM),
    "ffn_gate": ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
    "ffn_up": ("mlp.up_proj", INTERMEDIATE, HIDDEN),
    "ffn_down": ("mlp.down_proj", HIDDEN, INTERMEDIATE),
}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders q/k rows for its rotary layout (transformers undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)


def _write_tiny_gguf(path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Write the tiny GGUF; return its weights under their HF names (unpermuted) and its vocabulary."""
    rng = np.random.default_rng(0)
    tokens = CONTROL + list(bytes_to_unicode().values()) + ["he", "the", "Ġhe"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    # Q8_0 keeps an fp16 scale max|x| / 127 per 32 values: integers over 128 with a 127 in every block
    # de-quantize exactly, so the converted embedding must equal these values bit for bit.
    codes = rng.integers(-127, 128, (len(tokens), HIDDEN))
    codes[:, ::32] = 127
    weights = {"model.embed_tokens.weight": (codes / 128).astype(np.float32)}
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(weights["model.embed_tokens.weight"], q8), raw_dtype=q8)
    for layer in range(LAYERS):
        for name, (hf_name, rows, columns) in GGUF_LINEARS.items():
            weight = weights[f"model.layers.{layer}.{hf_name}.weight"] = rng.standard_normal(
                (rows, columns), np.float32
            )
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(name)
            writer.add_tensor(f"blk.{layer}.{name}.weight", _llama_cpp_permute(weight, heads) if heads else weight)
        for name, hf_name in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            norm = weights[f"model.layers.{layer}.{hf_name}.weight"] = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
            writer.add_tensor(f"blk.{layer}.{name}.weight", norm)
    weights["model.norm.weight"] = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])  # no output.weight: tied embeddings
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights, tokens


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the tiny GGUF, its weights under HF names, its vocabulary)."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    weights, tokens = _write_tiny_gguf(path)
    return path, weights, tokens


def test_tiny_gguf_converts_to_a_plain_hf_folder(tiny_gguf, tmp_path):
    path, weights, tokens = tiny_gguf
    target = tmp_path / "models" / "tiny"
    assert embedded_model.convert_gguf_to_hf(path, target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temporary folder left
    assert (target / "SOURCE").read_text() == f"converted from {path}\n"
    config = json.loads((target / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": len(tokens),
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {key: config.get(key) for key in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 50000.0 and config["rms_norm_eps"] == pytest.approx(1e-5)
    assert "quantization_config" not in config  # a plain model: save_pretrained and 4-bit loading work
    # every tensor as written (q/k back in HF row order, the Q8_0 embedding exact), nothing else (no lm_head)
    saved = load_file(target / "model.safetensors")
    assert sorted(saved) == sorted(weights)
    for name, weight in weights.items():
        assert torch.equal(saved[name], torch.from_numpy(weight)), name

    tokenizer = AutoTokenizer.from_pretrained(target)
    assert (tokenizer.eos_token, tokenizer.pad_token, len(tokenizer)) == ("<|im_end|>", "<|im_end|>", len(tokens))
    ids = tokenizer("<|im_start|>the he<|im_end|>")["input_ids"]  # control tokens whole, merges applied, no BOS
    assert ids == [1, tokens.index("the"), tokens.index("Ġhe"), 2]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False)
    assert text == "<|im_start|>user\nthe<|im_end|>\n"
    model = AutoModelForCausalLM.from_pretrained(target)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.fixture(scope="module")
def default_model():
    return load_model_and_tokenizer(DEFAULT_MODEL)


def test_cached_folder_matches_the_gguf_logits(default_model):
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


def test_conversion_is_atomic_and_reused(tiny_gguf, tmp_path, monkeypatch):
    """`python -m common.embedded_model` on the tiny GGUF standing in for the default's (the real one: conftest)."""
    monkeypatch.setattr(embedded_model, "find_embedded_gguf", lambda alias: tiny_gguf[0])
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
    monkeypatch.setattr(embedded_model, "find_embedded_gguf", lambda alias: tiny_gguf[0])
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


@pytest.mark.parametrize(
    "script", ["train.py", "merge_and_load.py", "evaluate.py", "average_adapters.py", "benchmarks/throughput.py"]
)
def test_scripts_load_without_the_bitsandbytes_kernel_hub_warning(script):
    """bitsandbytes (imported by peft up to 0.21, and by the QLoRA paths) warns on an AVX512-BF16 CPU that a kernel
    hub is out of reach (and falls back); common/__init__.py quiets that one logger, which works only if a script
    imports common/ first. The check imports bitsandbytes itself: peft 0.22 no longer does."""
    code = (
        f"import runpy, sys; runpy.run_path('{script}', run_name='loaded'); import peft, bitsandbytes; "
        "print('bitsandbytes' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().endswith("True")  # bitsandbytes was imported: the warning had its chance
    assert "gemm_4bit_forward" not in result.stderr
