"""A user's own --train-file without --validation-file: a seeded held-out split, recorded and reused.

train.py holds out --validation-split of the file (config.json records it), a resume and evaluate.py
reuse the recorded split, sweep.py gives every configuration the same split, the demo's data keeps
its own validation file, and the "files may be swapped" guard needs both files from the user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate
import sweep
import train
from common.data import DataError
from tests.conftest import REPO, make_conversation, write_jsonl
from tests.faults import inject_faults

FAST = ["--batch-size", "2", "--effective-batch-size", "2", "--rank", "4", "--alpha", "8", "--mixed-precision", "no",
        "--report-to", "none", "--num-samples", "0", "--no-baseline", "--max-seq-len", "256"]  # fmt: skip


@pytest.fixture(scope="module")
def eight_examples(tmp_path_factory) -> Path:
    """What a new user brings: one small file of their own (8 conversations)."""
    return write_jsonl(tmp_path_factory.mktemp("mine") / "my.jsonl", [make_conversation(300 + i) for i in range(8)])


def test_train_file_alone_holds_out_a_recorded_split(tiny_model_dir, eight_examples, tmp_path):
    run = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--train-file", str(eight_examples), "--output-dir", str(run), *FAST]
    summary = train.main([*argv, "--epochs", "1"])
    assert summary["status"] == "completed"
    config = json.loads((run / "config.json").read_text())
    split = config["dataset"]["validation_split"]
    assert config["args"]["validation_file"] is None and config["dataset"]["validation_sha256"] is None
    assert split["source"] == str(eight_examples) and split["seed"] == 1234 and split["fraction"] == 0.1
    assert split["source_examples"] == 8 and split["validation_examples"] == 1 and split["train_examples"] == 7
    held_out_id = f"toy-{300 + split['held_out_indices'][0]:03d}"
    assert split["held_out_ids"] == [held_out_id]
    assert config["derived"]["train_examples"] == 7 and config["derived"]["validation_examples"] == 1
    log = (run / "train.log").read_text()
    assert f"validation: 1 of the 8 examples of {eight_examples} held out (--validation-split 0.1, seed 1234" in log
    assert "7 train / 1 validation examples" in log
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert evals and all(e["val_tokens"] > 0 for e in evals)

    # evaluate.py on the adapter scores the same held-out example by default, and refuses a "test" split
    metrics = evaluate.main(["--adapter", str(run / "best"), "--output-dir", str(tmp_path / "eval"),
                             "--bootstrap", "10", "--max-new-tokens", "2", "--dtype", "fp32"])  # fmt: skip
    assert metrics["held_out_split"] == "validation" and metrics["examples"] == 1
    predictions = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in predictions] == [held_out_id]
    metrics = evaluate.main(["--adapter", str(run / "best"), "--output-dir", str(tmp_path / "eval-train"),
                             "--split", "train", "--bootstrap", "10", "--max-new-tokens", "2", "--dtype", "fp32"])  # fmt: skip
    assert metrics["held_out_split"] == "train" and metrics["examples"] == 7
    with pytest.raises(SystemExit, match=r"held out its validation split from .*my\.jsonl and has no test file"):
        evaluate.main(["--adapter", str(run / "best"), "--split", "test", "--output-dir", str(tmp_path / "x")])


def test_resume_reuses_the_recorded_split(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "mine.jsonl", [make_conversation(400 + i) for i in range(12)])
    run = tmp_path / "run"
    argv = ["--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir", str(run), *FAST,
            "--epochs", "2", "--save-every", "2", "--validation-split", "0.25"]  # fmt: skip
    inject_faults(monkeypatch, stop=3)
    with pytest.raises(SystemExit, match="injected crash after micro-step 3"):
        train.main(argv)
    monkeypatch.undo()
    first = json.loads((run / "config.json").read_text())["dataset"]["validation_split"]
    assert first["validation_examples"] == 3
    # a changed seed on resume does not move the split: the recorded held-out examples win
    train.main([*argv, "--resume-from", "latest", "--validation-split-seed", "99"])
    assert json.loads((run / "config.json").read_text())["dataset"]["validation_split"] == first


def test_too_small_to_split_is_refused_before_any_run_folder(tiny_model_dir, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [make_conversation(0)])
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as excinfo:
        train.main(["--model", str(tiny_model_dir), "--train-file", str(one), "--output-dir", str(run), *FAST])
    assert str(excinfo.value) == (
        f"error: {one} has 1 example(s): too few to hold out --validation-split 0.1 for validation and still "
        "train; add examples or pass --validation-file"
    )
    assert not run.exists()
    with pytest.raises(SystemExit, match=r"error: --validation-split must be in \(0, 1\), got 0.0"):
        train.main(["--model", str(tiny_model_dir), "--train-file", str(one), "--output-dir", str(run), *FAST,
                    "--validation-split", "0"])  # fmt: skip


def test_the_demo_data_keeps_its_validation_file(tiny_model_dir, tmp_path):
    run = tmp_path / "demo"
    train.main(["--model", str(tiny_model_dir), "--output-dir", str(run), *FAST, "--max-steps", "1", "--subset", "4",
                "--max-seq-len", "2048", "--eval-batch-size", "16"])  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["validation_file"] == str(REPO / "data" / "validation.jsonl")
    assert config["dataset"]["validation_split"] is None
    assert config["derived"]["validation_examples"] == len(
        (REPO / "data" / "validation.jsonl").read_text().splitlines()
    )


def test_swapped_files_guard_needs_both_files_from_the_user():
    examples = [{}] * 3
    # a default validation set or a held-out split larger than the training file is not the user's mistake
    train.check_splits("my.jsonl", examples, "data/validation.jsonl", examples * 2, 256, both_given=False)
    with pytest.raises(DataError, match=r"exchange the values of --train-file and --validation-file"):
        train.check_splits("my.jsonl", examples, "val.jsonl", examples * 2, 256, both_given=True)


def test_sweep_gives_every_configuration_the_same_split(tmp_path, eight_examples, caplog):
    grid = [("seed", ["1", "2"])]
    with caplog.at_level("INFO", logger="sweep"):
        assert sweep.check_validation_split(["--train-file", str(eight_examples)], grid) == 1234
    assert f"every configuration holds out the same 1 of the 8 examples of {eight_examples} (seed 1234)" in caplog.text
    assert sweep.check_validation_split([f"--train-file={eight_examples}", "--seed", "5"], []) == 5
    assert (
        sweep.check_validation_split(["--train-file", str(eight_examples), "--validation-file", "v.jsonl"], []) is None
    )
    assert sweep.check_validation_split([], grid) is None  # the demo's data: its own validation file
    command = sweep.build_command(
        "train.py", tmp_path / "run", "seed=1", {"seed": "1"}, None, ["--max-steps", "2"], 1234
    )
    assert command[-4:] == ["--validation-split-seed", "1234", "--max-steps", "2"]
    one = write_jsonl(tmp_path / "one.jsonl", [make_conversation(0)])
    with pytest.raises(SystemExit, match=r"sweep\.py: error: .*one\.jsonl has 1 example\(s\): too few to hold out"):
        sweep.main(["--grid", "lr=1e-4,2e-4", "--sweeps-dir", str(tmp_path / "sweeps"), "--dry-run", "--",
                    "--train-file", str(one)])  # fmt: skip
    with pytest.raises(SystemExit) as excinfo:  # the sweep sets the split seed itself
        sweep.parse_args(["--grid", "lr=1e-4", "--", "--validation-split-seed", "3"])
    assert excinfo.value.code == 2
