"""merge_and_load.py on the tiny model: LoRA and QLoRA parity, plain-transformers loading, refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig, pipeline

import export
import merge_and_load
from common.artifacts import round_trip_nf4
from common.model import load_model_and_tokenizer
from tests._fake_run import build_fake_run

PARITY_LINE = re.compile(r"max \|dlogit\| (\S+) \(tolerance 1e-03\).* identical (\d)/(\d)")


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory, tiny_model_dir, toy_data_dir) -> Path:
    root = tmp_path_factory.mktemp("lora")
    run = build_fake_run(root / "runs" / "toy", tiny_model_dir, toy_data_dir)
    return export.main(["--run", str(run), "--version", "1.0", "--output-dir", str(root / "exports")])


@pytest.fixture(scope="module")
def qlora_export(tmp_path_factory, tiny_model_dir, toy_data_dir) -> Path:
    root = tmp_path_factory.mktemp("qlora")
    run = build_fake_run(root / "runs" / "toy-qlora", tiny_model_dir, toy_data_dir, quantization="nf4", seed=1)
    return export.main(["--run", str(run), "--version", "1.0", "--output-dir", str(root / "exports")])


@pytest.fixture(scope="module")
def merged_lora(lora_export, toy_data_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged") / "toy"
    info = merge_and_load.main(
        ["--adapter", str(lora_export), "--output", str(out), "--data-file", str(toy_data_dir / "validation.jsonl")]
    )
    return out, info


def prompt_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "Applicant is 45, smoker, wants 500k term life."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_lora_merge_parity_and_files(merged_lora, lora_export, tiny_model_dir, default_tokenizer):
    out, info = merged_lora
    parity = info["parity"]
    assert parity["passed"] and parity["prompts"] == 3 and parity["identical_generations"] == 3
    assert parity["max_abs_logit_diff"] <= 1e-5  # float32 merge: summation-order noise only
    assert json.loads((out / "merge_info.json").read_text())["parity"] == parity

    names = {p.name for p in out.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    im_end = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == im_end

    # Independent check: plain transformers on the merged folder == PEFT adapter on the base.
    ids = prompt_ids(default_tokenizer)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        plain = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(lora_export)).eval()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (merged - plain).abs().max() > 1e-3  # the merge changed the model


def test_merged_folder_generates_through_a_plain_pipeline(merged_lora):
    out, _ = merged_lora
    chat = pipeline("text-generation", model=str(out))
    messages = [{"role": "user", "content": "Applicant is 45, smoker, wants 500k term life."}]
    result = chat(messages, max_new_tokens=5, do_sample=False)
    conversation = result[0]["generated_text"]
    assert conversation[0] == messages[0] and conversation[-1]["role"] == "assistant"
    assert isinstance(conversation[-1]["content"], str)


def test_load_only_and_load_merged(merged_lora, capsys):
    out, _ = merged_lora
    model, tokenizer = merge_and_load.load_merged(out)
    assert not isinstance(model, PeftModel) and type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template
    result = merge_and_load.main(["--load-only", str(out), "--prompt", "Applicant is 30.", "--max-new-tokens", "4"])
    assert isinstance(result["reply"], str)
    assert result["reply"] in capsys.readouterr().out
    assert len(tokenizer(result["reply"], add_special_tokens=False)["input_ids"]) <= 5


def test_trust_remote_code_is_off_by_default(lora_export, merged_lora, tmp_path):
    args = merge_and_load.parse_args(["--adapter", str(lora_export), "--output", str(tmp_path / "out")])
    assert args.trust_remote_code is False and args.max_new_tokens == 16
    args = merge_and_load.parse_args(["--load-only", str(merged_lora[0])])
    assert args.trust_remote_code is False and args.max_new_tokens == 128
    assert merge_and_load.parse_args(["--load-only", str(merged_lora[0]), "--trust-remote-code"]).trust_remote_code


def test_qlora_merge_uses_the_nf4_rounded_base(qlora_export, toy_data_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "merged-qlora"
    info = merge_and_load.main(
        ["--adapter", str(qlora_export), "--output", str(out), "--data-file", str(toy_data_dir / "validation.jsonl")]
    )
    printed = capsys.readouterr().out
    assert info["base_quantization"] == "nf4" and info["nf4_dtype"] == "bfloat16"  # the fake run's bf16 load
    assert info["parity"]["passed"] and info["parity"]["max_abs_logit_diff"] <= 1e-5
    reference = info["nf4_reference"]  # adapter on the real 4-bit base (bf16 compute): looser, not gated
    assert reference["max_abs_logit_diff"] < 0.1
    assert "reference, not gated" in printed

    # A linear layer the adapter does not touch holds exactly the NF4-dequantized weight (as trained on).
    merged = AutoModelForCausalLM.from_pretrained(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    nf4_model, _ = load_model_and_tokenizer(str(tiny_model_dir), quantization="nf4", dtype=torch.bfloat16)
    weight = nf4_model.model.layers[0].mlp.up_proj.weight
    dequantized = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    assert torch.equal(merged.model.layers[0].mlp.up_proj.weight, dequantized)
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(merged.lm_head.weight, original.lm_head.weight)  # NF4 never quantizes the LM head


def test_round_trip_nf4_matches_bitsandbytes_loading(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert round_trip_nf4(model, torch.bfloat16) == 14  # 2 layers x 7 linear layers
    nf4_model, _ = load_model_and_tokenizer(str(tiny_model_dir), quantization="nf4", dtype=torch.bfloat16)
    weight = nf4_model.model.layers[1].self_attn.q_proj.weight
    expected = bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float()
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, expected)


def test_parity_failure_publishes_nothing(lora_export, toy_data_dir, tmp_path, monkeypatch, capsys):
    def broken_merge(model):
        merged = model.merge_and_unload()
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        return merged

    monkeypatch.setattr(merge_and_load, "merge_adapter", broken_merge)
    out = tmp_path / "merged" / "bad"
    with pytest.raises(SystemExit) as excinfo:
        merge_and_load.main(
            ["--adapter", str(lora_export), "--output", str(out), "--data-file", str(toy_data_dir / "validation.jsonl")]
        )
    assert "parity check failed" in str(excinfo.value.code) and "was not written" in str(excinfo.value.code)
    match = PARITY_LINE.search(capsys.readouterr().out)
    assert match and float(match.group(1)) > 1e-3  # the numbers were printed
    assert list((tmp_path / "merged").iterdir()) == []  # no output, no temp folder


def test_existing_output_needs_force_and_builtin_prompts(merged_lora, lora_export, tmp_path, capsys):
    out, _ = merged_lora
    with pytest.raises(SystemExit) as excinfo:
        merge_and_load.main(["--adapter", str(lora_export), "--output", str(out)])
    assert excinfo.value.code == 2 and "--force" in capsys.readouterr().err

    missing = tmp_path / "no-such.jsonl"
    info = merge_and_load.main(
        ["--adapter", str(lora_export), "--output", str(out), "--force", "--data-file", str(missing)]
    )
    printed = capsys.readouterr().out
    assert "built-in prompts" in printed and PARITY_LINE.search(printed)
    assert info["parity"]["passed"] and info["parity"]["prompts"] == 3

    info = merge_and_load.main(["--adapter", str(lora_export), "--output", str(out), "--force", "--no-verify"])
    assert "parity" not in info and "parity" not in capsys.readouterr().out
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the old folder and temp folders are gone
