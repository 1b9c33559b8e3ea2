"""Security: only safetensors are written, nothing unpickles, remote code stays off, secrets never
leak into run folders or exports, and names cannot escape their folders.

    python -m pytest -q tests/test_security.py

A tiny training run (checkpoints, best/, final/, samples, TensorBoard) and an export of it are made
with fake HF_TOKEN / WANDB_API_KEY values in the environment; every file they write is then read back.
The code checks parse the repository's .py files (AST, not grep, so comments and strings don't count).
"""

from __future__ import annotations

import ast
import importlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

import train
from common.model import ModelLoadError
from tests.conftest import REPO

FAKE_SECRETS = {
    "HF_TOKEN": "hf_SecurityTestFakeToken0123456789abcdefXY",
    "WANDB_API_KEY": "f00dfacecafe0123456789abcdef0123456789ab",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
SKIP_DIRS = {".venv", ".git", "runs", "exports", "merged", "sweeps", "__pycache__", ".pytest_cache", ".hypothesis"}
SCRIPTS = ["train.py", "evaluate.py", "export.py", "merge_and_load.py", "profile_memory.py", "sweep.py"]


def python_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(REPO).parts))


def is_test_file(path: Path) -> bool:
    return path.relative_to(REPO).parts[0] == "tests"


def call_name(node: ast.Call) -> str:
    """'torch.load' for torch.load(...), 'load' for load(...), '' for anything fancier."""
    func = node.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{func.value.id}.{func.attr}"
    return func.attr if isinstance(func, ast.Attribute) else ""


def keyword_is(node: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in node.keywords)


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, tiny_model_dir, toy_data_dir) -> dict:
    """A tiny run and its export, made with fake secrets in the environment."""
    root = tmp_path_factory.mktemp("secrets")
    run = root / "run"
    # The secrets also reach train.py through its inputs, so that the run config would carry them:
    # the data folder's name holds the HF token (given by a flag), the --config file's folder holds
    # the W&B key, and that file names the training file in the token's folder.
    data = root / f"data-{FAKE_SECRETS['HF_TOKEN']}"
    shutil.copytree(toy_data_dir, data)
    config_file = root / f"config-{FAKE_SECRETS['WANDB_API_KEY']}" / "run.yaml"
    config_file.parent.mkdir()
    config_file.write_text(f"train_file: {data / 'train.jsonl'}\nrank: 4\n")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in FAKE_SECRETS.items():
            patch.setenv(name, value)
        train.main([
            "--config", str(config_file), "--model", str(tiny_model_dir),
            "--validation-file", str(data / "validation.jsonl"), "--output-dir", str(run),
            "--epochs", "1", "--batch-size", "4", "--grad-accum", "1", "--save-every", "2",
            "--mixed-precision", "no", "--report-to", "tensorboard", "--num-samples", "1", "--max-new-tokens", "4",
        ])  # fmt: skip
        export = pytest.importorskip("export")
        exported = export.main(["--run", str(run), "--version", "1.0", "--output-dir", str(root / "exports")])
    return {"run": run, "export": exported}


def test_only_safetensors_and_text_are_written(secret_run, record_property):
    """Every file of a run folder and its export: safetensors or text, no pickle/torch.save archive"""
    files = [p for folder in secret_run.values() for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 40 and {p.parent.name for p in files} >= {"best", "final", "step_000002", "run-v1.0"}
    kinds = {"safetensors": 0, "text": 0, "tensorboard": 0}
    for path in files:
        assert path.suffix not in PICKLE_SUFFIXES, path
        head = path.read_bytes()[:4]
        assert head[:1] != b"\x80" and head != b"PK\x03\x04", f"{path} looks like a pickle / torch.save archive"
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                assert list(handle.keys()), path
            kinds["safetensors"] += 1
        elif path.name.startswith("events.out.tfevents."):
            kinds["tensorboard"] += 1  # TensorBoard's own protobuf records, no pickle
        else:
            path.read_text(encoding="utf-8")  # JSON, JSONL, Markdown, logs, jinja: all text
            kinds["text"] += 1
    assert kinds["safetensors"] >= 7 and kinds["tensorboard"] >= 1
    record_property("observed", f"{len(files)} files: {kinds['safetensors']} safetensors, {kinds['text']} text, "
                                f"{kinds['tensorboard']} TensorBoard event files, 0 pickle")  # fmt: skip


def test_secrets_never_reach_run_folder_logs_or_export(secret_run, record_property):
    """HF_TOKEN / WANDB_API_KEY in the environment, in a flag's value and in a --config file appear in no file of
    the run folder (config.json, train.log, every JSON) or the export"""
    files = [p for folder in secret_run.values() for p in folder.rglob("*") if p.is_file()]
    for path in files:
        data = path.read_bytes()
        for name, value in FAKE_SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path}"
    run = secret_run["run"]
    assert (run / "train.log").stat().st_size > 0 and (secret_run["export"] / "README.md").stat().st_size > 0
    config = json.loads((run / "config.json").read_text())
    assert not {"hf_token", "wandb_api_key", "HF_TOKEN", "WANDB_API_KEY"} & set(config["args"])
    # the flag, the --config file and the value it set are all in the config, redacted
    for key in ("config", "train_file", "validation_file"):
        assert "<redacted>" in config["args"][key], key
    assert config["args"]["rank"] == 4  # the --config file was read
    record_property(
        "observed", f"scanned {len(files)} files (config.json, train.log, TensorBoard, model card): no secret"
    )


def test_torch_load_only_with_weights_only_and_no_pickle_anywhere(record_property):
    """Code scan: every torch.load passes weights_only=True; no pickle, torch.save or safe_serialization=False"""
    problems, scanned = [], python_files()
    for path in scanned:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
                if any(alias.name in ("load", "loads", "save") for alias in node.names):
                    problems.append(f"{where}: from {node.module} import load/save hides it from this scan")
            if not isinstance(node, ast.Call):
                continue
            name = call_name(node)
            if name == "torch.load" and not keyword_is(node, "weights_only", True):
                problems.append(f"{where}: torch.load without weights_only=True")
            if name.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") or keyword_is(
                node, "allow_pickle", True
            ):
                problems.append(f"{where}: {name}: unpickling/pickling")
            if keyword_is(node, "safe_serialization", False):
                problems.append(f"{where}: safe_serialization=False")
            if name == "torch.save" and not is_test_file(path):
                problems.append(f"{where}: torch.save writes a pickle; use safetensors")
    assert len(scanned) > 20
    assert not problems, "\n".join(problems)
    record_property("observed", f"{len(scanned)} .py files parsed: no torch.load without weights_only, no pickle")


def test_trust_remote_code_is_off_unless_asked(record_property):
    """Code scan: no trust_remote_code=True literal, every trust_remote_code parameter defaults to False"""
    problems = []
    for path in python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and keyword_is(node, "trust_remote_code", True):
                problems.append(f"{where}: trust_remote_code=True")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                positional = args.posonlyargs + args.args
                pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
                for arg, default in pairs:
                    if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant) and default.value is False):  # fmt: skip
                        problems.append(f"{where}: {node.name}(trust_remote_code=...) must default to False")
    assert not problems, "\n".join(problems)
    record_property("observed", "no trust_remote_code=True in the code; every default is False")


def script_argv(script: str, secret_run: dict, tiny_model_dir: Path) -> list[str]:
    """The smallest command line each script's parse_args accepts."""
    return {
        "export": ["--run", str(secret_run["run"]), "--version", "9.9"],
        "merge_and_load": ["--load-only", str(tiny_model_dir)],
    }.get(script, [])


@pytest.mark.parametrize("script", ["train", "evaluate", "export", "merge_and_load", "profile_memory"])
def test_every_script_defaults_trust_remote_code_off(script, secret_run, tiny_model_dir, record_property):
    """Every script's --trust-remote-code flag defaults to off and turns on only when given"""
    module = importlib.import_module(script)
    argv = script_argv(script, secret_run, tiny_model_dir)
    assert module.parse_args(argv).trust_remote_code is False
    assert module.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True
    record_property("observed", f"{script}.py: default False, --trust-remote-code -> True")


def test_train_passes_trust_remote_code_only_when_asked(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, record_property):  # fmt: skip
    """train.py hands trust_remote_code=False to the model loader unless --trust-remote-code is given"""
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise ModelLoadError("stopped by the test after the loader call")

    monkeypatch.setattr(train, "load_model_and_tokenizer", spy)
    base = ["--model", str(tiny_model_dir), "--train-file", str(toy_data_dir / "train.jsonl"),
            "--validation-file", str(toy_data_dir / "validation.jsonl"), "--output-dir", str(tmp_path / "run"),
            "--mixed-precision", "no", "--report-to", "none"]  # fmt: skip
    for extra in ([], ["--trust-remote-code"]):
        with pytest.raises(SystemExit, match="stopped by the test"):
            train.main([*base, *extra])
    assert seen == [False, True] and not (tmp_path / "run").exists()
    record_property("observed", f"loader saw trust_remote_code={seen[0]} by default, {seen[1]} with the flag")


EXPORT_NAMES = [
    ("--name", "../../x"), ("--name", "a/b"), ("--name", "/tmp/absolute"), ("--name", ".."), ("--name", ".hidden"),
    ("--name", "..\\x"), ("--name", ""), ("--version", "../1"), ("--version", "1/../../x"), ("--version", "1.0/.."),
]  # fmt: skip


@pytest.mark.parametrize(("flag", "value"), EXPORT_NAMES, ids=[f"{f} {v or '(empty)'}" for f, v in EXPORT_NAMES])
def test_export_names_cannot_escape_the_exports_folder(secret_run, tmp_path, capsys, flag, value, record_property):
    """Path traversal in an export name or version is refused before anything is written"""
    export = pytest.importorskip("export")
    exports = tmp_path / "deep" / "exports"
    argv = ["--run", str(secret_run["run"]), "--version", "1.0", "--output-dir", str(exports), flag, value]
    with pytest.raises(SystemExit) as excinfo:
        export.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    record_property("observed", "error: " + error.split("error: ", 1)[-1])  # without argparse's program name
    assert excinfo.value.code == 2 and f"{flag} {value!r} is not allowed" in error
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [], "something was written"


def test_run_name_cannot_escape_the_runs_folder(record_property):
    """train.py --run-name with a path (../../x) is refused instead of writing outside runs/"""
    args = train.parse_args(["--run-name", "../../outside"])
    with pytest.raises(SystemExit) as excinfo:
        train.validate_args(args, num_processes=1)
    record_property("observed", str(excinfo.value))
    assert "--run-name" in str(excinfo.value)
