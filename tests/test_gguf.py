"""export.py --gguf on the tiny model: GGUF round trip, metadata, Modelfile, refusals (common.gguf_export, common.modelfile).

Needs llama.cpp's converter (`make gguf-setup`); the llama.cpp checks run only where llama_cpp is importable.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import export
from common import gguf_export
from common.gguf_export import (
    GGUFError,
    check_metadata,
    find_converter,
    install_converter,
    parse_each_gguf_once,
    read_gguf_metadata,
)
from common.modelfile import (
    TemplateError,
    build_ollama_template,
    check_modelfile,
    derive_template_parts,
    read_modelfile_template,
    render_go_template,
)
from tests._fake_run import build_fake_run

try:
    CONVERTER = find_converter()
except GGUFError:
    CONVERTER = None
needs_converter = pytest.mark.skipif(
    CONVERTER is None, reason="llama.cpp's converter is not installed: make gguf-setup"
)
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)
GGUF_FLAGS = ["--gguf", "f16,q8_0", "--gguf-lora"]
SYSTEM = "You are an insurance underwriting assistant."  # the toy data's system prompt (tests/conftest.py)


@functools.lru_cache
def parsed(path: Path, mtime_ns: int) -> GGUFReader:
    return GGUFReader(path)  # ~5 s a file with a vocabulary: once per file version


def read_field(path: Path, key: str):
    return parsed(path, path.stat().st_mtime_ns).fields[key].contents()


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, tiny_model_dir, toy_data_dir) -> Path:
    return build_fake_run(tmp_path_factory.mktemp("gguf") / "runs" / "toy", tiny_model_dir, toy_data_dir)


@pytest.fixture(scope="module")
def gguf_export_dir(gguf_run) -> Path:
    if CONVERTER is None:
        pytest.skip("llama.cpp's converter is not installed: make gguf-setup")
    out = gguf_run.parent.parent / "exports"
    return export.main(["--run", str(gguf_run), "--version", "1.0", "--output-dir", str(out), *GGUF_FLAGS])


@torch.no_grad()
def merged_logits(tiny_model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """The reference, built here without common.gguf_export: the tiny base + the exported adapter, merged."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()
    return model(input_ids=ids).logits


@needs_converter
def test_gguf_files_reload_with_the_merged_models_logits(gguf_export_dir, tiny_model_dir):
    gguf_dir = gguf_export_dir / "gguf"
    names = {p.name for p in gguf_dir.iterdir()}
    assert names == {"toy-v1.0-f16.gguf", "toy-v1.0-q8_0.gguf", "toy-v1.0-lora.gguf", "Modelfile", "gguf_check.json"}
    tokenizer = AutoTokenizer.from_pretrained(gguf_export_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Applicant is 45, smoker, wants 500k term life."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    reference = merged_logits(tiny_model_dir, gguf_export_dir, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (reference - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter is in the GGUF or not
        diffs = {}
        for gguf_type in ("f16", "q8_0"):
            name = f"toy-v1.0-{gguf_type}.gguf"
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=name, dtype=torch.float32).eval()
            diffs[gguf_type] = (model(input_ids=ids).logits - reference).abs().max().item()
    assert 0 < diffs["f16"] < 0.01  # f16 rounding of a 64-wide model, not a copy of the f32 weights
    assert diffs["f16"] < diffs["q8_0"] < 0.1
    # q8_0 stores 34 bytes per 32 weights, f16 64: the file shrinks accordingly (plus the same vocabulary)
    sizes = {t: (gguf_dir / f"toy-v1.0-{t}.gguf").stat().st_size for t in ("f16", "q8_0")}
    assert 0.5 < sizes["q8_0"] / sizes["f16"] < 0.75

    report = json.loads((gguf_dir / "gguf_check.json").read_text())
    assert report["passed"] and report["prompts"] == 3 and report["tokenizer"]["tokens_identical"]
    for gguf_type, result in report["files"].items():
        assert result["passed"] and result["transformers"]["identical_generations"] == 3, gguf_type
        assert result["bytes"] == sizes[gguf_type]
    assert report["files"]["f16"]["transformers"]["tolerance"] == 0.1
    assert report["files"]["f16"]["transformers"]["max_abs_logit_diff"] < 0.01


@needs_converter
def test_gguf_metadata_matches_the_export(gguf_export_dir, default_tokenizer):
    im_end = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(gguf_export_dir).eos_token_id == im_end
    template = (gguf_export_dir / "chat_template.jinja").read_text()
    for gguf_type in ("f16", "q8_0"):
        path = gguf_export_dir / "gguf" / f"toy-v1.0-{gguf_type}.gguf"
        assert read_field(path, "tokenizer.ggml.eos_token_id") == im_end
        assert read_field(path, "tokenizer.chat_template") == template
        assert read_field(path, "tokenizer.ggml.pre") == "smollm"  # SmolLM2's pre-tokenizer, known to llama.cpp
    lora = gguf_export_dir / "gguf" / "toy-v1.0-lora.gguf"
    assert read_field(lora, "general.type") == "adapter" and read_field(lora, "adapter.type") == "lora"
    assert read_field(lora, "adapter.lora.alpha") == 8.0
    assert len(parsed(lora, lora.stat().st_mtime_ns).tensors) == 2 * 2 * 3  # A and B, 2 layers, q/k/v


def test_check_metadata_flags_each_mismatch():
    good = {
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.chat_template": "T",
    }
    assert check_metadata(good, "T", [2])["passed"]
    wrong_eos = check_metadata(good | {"tokenizer.ggml.eos_token_id": 0}, "T", [2])
    assert not wrong_eos["passed"] and not wrong_eos["end_tokens_match"] and wrong_eos["chat_template_identical"]
    extra_eot = check_metadata(good | {"tokenizer.ggml.eot_token_id": 0}, "T", [2])
    assert not extra_eot["end_tokens_match"]  # the GGUF would stop where transformers does not
    assert check_metadata(good | {"tokenizer.ggml.eot_token_id": 0}, "T", [2, 0])["passed"]
    template = check_metadata(good, "T\n", [2])
    assert not template["passed"] and not template["chat_template_identical"]
    pre = check_metadata(good | {"tokenizer.ggml.pre": "default"}, "T", [2])
    assert not pre["passed"] and not pre["pre_tokenizer_recognised"]
    spm = good | {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default"}
    assert check_metadata(spm, "T", [2])["passed"]  # sentencepiece vocabularies have no pre-tokenizer


@needs_converter
def test_modelfile_renders_what_the_chat_template_renders(gguf_export_dir, default_tokenizer):
    modelfile = (gguf_export_dir / "gguf" / "Modelfile").read_text()
    lines = modelfile.splitlines()
    assert lines[0] == "FROM ./toy-v1.0-f16.gguf" and (gguf_export_dir / "gguf" / "toy-v1.0-f16.gguf").is_file()
    assert 'PARAMETER stop "<|im_end|>"' in lines and f'SYSTEM """{SYSTEM}"""' in lines
    template = read_modelfile_template(modelfile)
    values = {
        "System": "Be brief.",
        "Messages": [
            {"Role": "system", "Content": "Be brief."},
            {"Role": "user", "Content": "Hi"},
            {"Role": "assistant", "Content": "Hello.\nHow can I help?"},
            {"Role": "user", "Content": "Quote?"},
        ],
    }
    # written out by hand from SmolLM2's ChatML format: independent of both renderers
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello.\nHow can I help?<|im_end|>\n<|im_start|>user\nQuote?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_go_template(template, values) == expected
    messages = [{"role": m["Role"].lower(), "content": m["Content"]} for m in values["Messages"]]
    assert default_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected

    report = json.loads((gguf_export_dir / "gguf" / "gguf_check.json").read_text())["modelfile"]
    assert report["passed"] and report["conversations"] == 8 and report["stop"] == ["<|im_end|>"]
    broken = modelfile.replace("{{ .Content }}<|im_end|>\n", "{{ .Content }}<|im_end|>", 1)
    result = check_modelfile(broken, default_tokenizer, [messages], SYSTEM)
    assert not result["passed"] and result["mismatches"] == 2


def test_go_template_renderer_follows_go_semantics():
    template = '{{ if .System }}[{{ .System }}]{{ else }}none{{ end }}{{ range .Messages }}{{ if eq .Role "a" }}A{{ else if not .Content }}empty{{ else }}{{ .Content }}{{ end }};{{ end }}'
    values = {"System": "", "Messages": [{"Role": "a", "Content": "x"}, {"Role": "b", "Content": ""}]}
    assert render_go_template(template, values) == "noneA;empty;"
    values = {"System": "s", "Messages": [{"Role": "b", "Content": "y"}]}
    assert render_go_template(template, values) == "[s]y;"
    with pytest.raises(TemplateError, match="trim markers"):
        render_go_template("{{- .System }}", values)
    with pytest.raises(TemplateError, match="missing"):
        render_go_template("{{ if .System }}x", values)


def test_a_template_that_is_not_per_message_is_refused(default_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(default_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(TemplateError, match="drops or reorders"):
        derive_template_parts(tokenizer)
    tokenizer.chat_template = default_tokenizer.chat_template
    parts = derive_template_parts(tokenizer)
    assert parts["user_open"] == "<|im_start|>user\n" and parts["generation_prompt"] == "<|im_start|>assistant\n"
    assert "SmolLM" in parts["default_system"]  # the block SmolLM2's template adds when there is no system turn
    assert build_ollama_template(parts).endswith("{{ end }}{{ end }}<|im_start|>assistant\n")


@needs_converter
def test_model_card_run_it_section(gguf_export_dir, gguf_run):
    card = (gguf_export_dir / "README.md").read_text()
    section = card.split("\n## Run it\n", 1)[1].split("\n## ", 1)[0]
    assert "llama-server -m exports/toy-v1.0/gguf/toy-v1.0-f16.gguf --jinja" in section
    assert "--lora exports/toy-v1.0/gguf/toy-v1.0-lora.gguf" in section
    assert "cd exports/toy-v1.0/gguf && ollama create toy -f Modelfile && ollama run toy" in section
    assert "vllm serve merged/toy-v1.0" in section and "--enable-lora --lora-modules toy=exports/toy-v1.0" in section
    assert section.count("<|im_end|>") >= 4
    report = json.loads((gguf_export_dir / "gguf" / "gguf_check.json").read_text())
    f16 = report["files"]["f16"]["transformers"]["max_abs_logit_diff"]
    assert f"| f16 | {report['files']['f16']['bytes'] / 2**20:,.1f} MiB | {f16:.4g} | 3/3 |" in section


def test_missing_converter_is_one_line_and_keeps_earlier_exports(gguf_run, tmp_path, monkeypatch):
    out = tmp_path / "exports"
    earlier = export.main(["--run", str(gguf_run), "--version", "1.0", "--output-dir", str(out)])
    before = {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()}
    monkeypatch.setenv(gguf_export.CONVERTER_ENV, str(tmp_path / "no-converter"))
    argv = ["--run", str(gguf_run), "--version", "1.0", "--output-dir", str(out), "--force", "--gguf", "f16"]
    with pytest.raises(SystemExit) as excinfo:
        export.main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("export.py: error: --gguf: ") and "\n" not in message
    assert "make gguf-setup" in message and str(tmp_path / "no-converter") in message
    assert {p.name: p.read_bytes() for p in earlier.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["toy-v1.0"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gguf", "f16,q4"], "--gguf q4: choose among f32,f16,bf16,q8_0"),
        (["--gguf-lora"], "--gguf-lora and --quantize need --gguf TYPES"),
        (["--gguf", "q8_0", "--quantize", "Q4_K_M"], "--quantize starts from a f32, bf16 or f16 GGUF"),
    ],
)
def test_bad_gguf_flags_are_usage_errors(gguf_run, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as excinfo:
        export.main(["--run", str(gguf_run), "--version", "1.0", "--output-dir", str(tmp_path), *flags])
    assert excinfo.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@needs_converter
def test_failed_gguf_check_publishes_nothing(gguf_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gguf_export.LOGIT_TOLERANCE, "f16", 1e-9)  # f16 rounding alone exceeds it
    argv = ["--run", str(gguf_run), "--version", "2.0", "--output-dir", str(tmp_path), "--gguf", "f16"]
    with pytest.raises(SystemExit) as excinfo:
        export.main(argv)
    message = str(excinfo.value.code)
    assert message.startswith("export.py: error: GGUF check failed (f16: max |dlogit| ")
    assert "> 1e-09)" in message and "nothing was published" in message
    assert not list(tmp_path.iterdir())  # neither the export nor its temporary folders


def test_install_converter_refuses_a_wrong_sdist(tmp_path):
    fake = tmp_path / gguf_export.SDIST_NAME
    with tarfile.open(fake, "w:gz") as archive:
        archive.add(__file__, arcname="llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py")
    with pytest.raises(GGUFError, match=r"sha256 .* expected 832db0699007"):
        install_converter(tmp_path / "converter", sdist=fake)
    assert not (tmp_path / "converter").exists()


@needs_converter
def test_installed_converter_is_the_pinned_one():
    assert (CONVERTER / "COMPLETE").read_text() == f"{gguf_export.SDIST_NAME} sha256 {gguf_export.SDIST_SHA256}\n"
    for name in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/lazy.py"):
        assert (CONVERTER / name).is_file(), name


@needs_converter
@needs_llama_cpp
def test_llama_cpp_loads_q8_0_without_extra_buffer_types_and_matches(gguf_export_dir):
    llm = gguf_export.load_llama_cpp(gguf_export_dir / "gguf" / "toy-v1.0-q8_0.gguf")
    assert llm.model_params.use_extra_bufts is False
    report = json.loads((gguf_export_dir / "gguf" / "gguf_check.json").read_text())
    for gguf_type in ("f16", "q8_0"):
        result = report["files"][gguf_type]["llama_cpp"]
        assert result["passed"] and result["identical_generations"] == 3 and result["use_extra_bufts"] is False
        assert result["tokens_identical"] and result["stopped_at_end_of_turn"] == result["expected_stops"]


def test_greedy_divergence_passes_only_at_a_near_tie():
    step_logits = torch.zeros(3, 5)
    step_logits[1, 2], step_logits[1, 4] = 1.0, 0.9  # step 1: the reference's 2 beats 4 by 0.1
    assert gguf_export.first_divergence([1, 2, 3], [1, 4, 0], step_logits) == pytest.approx({"step": 1, "margin": 0.1})
    assert gguf_export.first_divergence([1, 2], [1, 2, 3], step_logits)["margin"] == float("inf")

    def report(max_diff: float, margin: float) -> dict:
        metadata = check_metadata({"tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": "T"}, "T", [2])
        hf = {"max_abs_logit_diff": max_diff, "tolerance": None, "identical_generations": 2, "prompts": 3}
        hf |= {"divergences": [{"step": 7, "margin": margin}], "near_tie_divergences": int(margin <= max_diff)}
        return {"files": {"q8_0": {"metadata": metadata, "transformers": hf}}}

    assert gguf_export.failed_checks(report(max_diff=0.8, margin=0.3)) == []
    assert gguf_export.failed_checks(report(max_diff=0.8, margin=2.5)) == [
        "q8_0: greedy text identical 2/3 (step 7 by 2.5)"
    ]


def test_the_checks_parse_each_gguf_file_once(gguf_export_dir, monkeypatch):
    """transformers' loaders and our metadata reader share one parse of a file while the checks run."""
    import gguf
    from transformers import AutoConfig

    parses, original = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda path, mode="r": parses.append(path) or original(path, mode))
    path = gguf_export_dir / "gguf" / "toy-v1.0-f16.gguf"
    with parse_each_gguf_once():
        assert read_gguf_metadata(path)["general.architecture"] == "llama"
        assert AutoConfig.from_pretrained(path.parent, gguf_file=path.name).num_hidden_layers == 2
        read_gguf_metadata(path)
        assert len(parses) == 1
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # rewritten: parsed again
        read_gguf_metadata(path)
        assert len(parses) == 2
    read_gguf_metadata(path)
    assert len(parses) == 3  # outside the checks every read parses
