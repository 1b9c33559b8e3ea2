"""Dataset shapes teams bring, auto-detected: ShareGPT, Alpaca, a `datasets.save_to_disk` folder.

Each shape is read into the same chat messages as ours, a record fitting no shape gets the usual
one-line error (file:line and the fields found), and each shape trains 2 steps on the tiny model.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import datasets
import pytest

import train
from common.data import DataError, load_records, tokenize_records
from tests.conftest import make_conversation, write_jsonl

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}
FAST = ["--batch-size", "2", "--effective-batch-size", "2", "--rank", "4", "--alpha", "8", "--mixed-precision", "no",
        "--report-to", "none", "--num-samples", "1", "--max-new-tokens", "2", "--no-baseline", "--max-steps", "2"]  # fmt: skip


def sharegpt(i: int) -> dict:
    """Our toy conversation i in ShareGPT form."""
    record = make_conversation(i)
    turns = [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in record["messages"]]
    return {"id": record["id"], "conversations": turns}


def alpaca(i: int) -> dict:
    """An Alpaca record: instruction, input (empty for every third), output."""
    return {
        "instruction": "Give the underwriting decision for this applicant.",
        "input": "" if i % 3 == 0 else f"Applicant is {30 + i}, non-smoker, BMI {20 + i % 10}.",
        "output": f"Rule L-{1 + i % 3} applies.\nDECISION: approve | CLASS: standard | RULES: L-{1 + i % 3}",
    }


def test_sharegpt_records_become_chat_messages(tmp_path):
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [sharegpt(i) for i in range(3)])
    records = load_records(path)
    assert [r["messages"] for r in records] == [make_conversation(i)["messages"] for i in range(3)]
    assert records[0]["id"] == "toy-000"  # the other fields are kept
    # a conversations cell holding JSON text (CSV) is read the same way
    csv_path = tmp_path / "sharegpt.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "conversations"])
        writer.writerows([i, json.dumps(sharegpt(i)["conversations"])] for i in range(2))
    assert [r["messages"] for r in load_records(csv_path)] == [make_conversation(i)["messages"] for i in range(2)]


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([{"from": "bot", "value": "hi"}], "conversations[0].from is 'bot'; expected one of human, gpt, system"),
        ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}], "conversations[1].value is empty"),
        ([{"from": "human", "value": "hi"}], "no assistant turn; nothing to train on"),
        ([{"from": "human", "value": "a"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}],
         "conversations[1] is a system turn; only conversations[0] may be system"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}], "conversations[0].value must be a string, got int"),
        ("hello", "'conversations' must be a non-empty list of {from, value} objects"),
    ],
)  # fmt: skip
def test_bad_sharegpt_records_name_line_and_field(tmp_path, turns, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [sharegpt(0), {"conversations": turns}])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert str(excinfo.value).startswith(f"{path}:2: {message}")


def test_alpaca_records_become_one_exchange(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [alpaca(0), alpaca(1), {**alpaca(2), "system": "Be brief."}])
    records = load_records(path)
    assert records[0]["messages"] == [
        {"role": "user", "content": "Give the underwriting decision for this applicant."},
        {"role": "assistant", "content": alpaca(0)["output"]},
    ]
    assert records[1]["messages"][0]["content"] == f"{alpaca(1)['instruction']}\n\n{alpaca(1)['input']}"
    assert records[2]["messages"][0] == {"role": "system", "content": "Be brief."}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Decide.", "input": "age 40"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'output' must be a non-empty string \(Alpaca records"):
        load_records(bad)


def test_record_fitting_no_shape_names_line_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "other.jsonl", [sharegpt(0), {"question": "q?", "answer": "a.", "id": 7}])
    with pytest.raises(DataError) as excinfo:
        load_records(path)
    assert str(excinfo.value) == (
        f"{path}:2: missing field 'messages' (or 'conversations', 'prompt'+'completion', 'instruction'+'output', "
        "or 'text'); found ['answer', 'id', 'question']"
    )


def test_save_to_disk_folder_is_read_like_a_file(tmp_path, default_tokenizer):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([make_conversation(i) for i in range(4)]).save_to_disk(str(folder))
    records = load_records(folder)
    assert [r["messages"] for r in records] == [make_conversation(i)["messages"] for i in range(4)]
    assert [r["_line"] for r in records] == [1, 2, 3, 4]
    examples, stats = tokenize_records(records, default_tokenizer, 512)
    assert stats.kept == 4 and all(e["n_trained"] > 0 for e in examples)
    # the other save_to_disk shapes work too (Alpaca rows here), and errors name folder:row
    datasets.Dataset.from_list([alpaca(0), {"instruction": "x", "input": "", "output": ""}]).save_to_disk(
        str(tmp_path / "alpaca")
    )
    with pytest.raises(DataError, match=r"alpaca:2: 'output' must be a non-empty string"):
        load_records(tmp_path / "alpaca")
    # a DatasetDict folder or any other folder: what to pass instead
    datasets.DatasetDict({"train": datasets.Dataset.from_list([sharegpt(0)])}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"a DatasetDict folder \(splits \['train'\]\); pass one split's folder"):
        load_records(tmp_path / "dict")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a folder, but not one written by datasets\.Dataset\.save_to_disk"):
        load_records(tmp_path / "plain")


@pytest.fixture(scope="module")
def shape_files(tmp_path_factory) -> dict[str, Path]:
    """One training set per shape (12 conversations each)."""
    folder = tmp_path_factory.mktemp("shapes")
    saved = folder / "saved"
    datasets.Dataset.from_list([make_conversation(i) for i in range(12)]).save_to_disk(str(saved))
    return {
        "sharegpt": write_jsonl(folder / "sharegpt.jsonl", [sharegpt(i) for i in range(12)]),
        "alpaca": write_jsonl(folder / "alpaca.jsonl", [alpaca(i) for i in range(12)]),
        "save_to_disk": saved,
    }


@pytest.mark.parametrize("shape", ["sharegpt", "alpaca", "save_to_disk"])
def test_each_shape_trains_two_steps(tiny_model_dir, shape_files, tmp_path, shape, default_tokenizer):
    """Each step trains on the assistant tokens of the examples it logged (counted here from the file), and
    the untrained tiny model's loss is ~ln(vocab)"""
    run = tmp_path / shape
    data = shape_files[shape]
    argv = ["--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir", str(run), "--log-examples"]
    summary = train.main([*argv, *FAST])
    assert summary["status"] == "max_steps" and summary["global_step"] == 2
    steps = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["type"] == "step"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["loss"] == pytest.approx(math.log(len(default_tokenizer)), abs=0.1) for s in steps)
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"]["train_file"] == str(data) and len(config["dataset"]["train_sha256"]) == 64
    split = config["dataset"]["validation_split"]
    assert split["validation_examples"] == 1  # only a train file: 1 of 12 held out
    held_out = set(split["held_out_indices"])
    kept = [r for i, r in enumerate(load_records(data)) if i not in held_out]
    examples, _ = tokenize_records(kept, default_tokenizer, 1024)
    logged = [json.loads(line) for line in (run / "examples_rank0.jsonl").read_text().splitlines()]
    assert [len(m["index"]) for m in logged] == [2, 2]  # one micro-batch of 2 per step
    for step, micro in zip(steps, logged):
        assert step["trained_tokens"] == sum(examples[i]["n_trained"] for i in micro["index"])
    assert (run / "final" / "adapter_model.safetensors").is_file()
