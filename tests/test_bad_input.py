"""Bad input: every malformed data file and invalid flag gets one clear message and no run folder.

    python -m pytest -q tests/test_bad_input.py

Table-driven: each case runs train.main() in-process on the tiny model and expects SystemExit with
one line that names the file:line and field (data) or the flag (flags) and says what to do, and the
output folder must not exist afterwards. Property-based (hypothesis): for arbitrary JSON-ish records
and files, the loader returns valid normalized records or raises DataError naming the exact line,
never another exception type.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import train
from common.data import VALID_ROLES, DataError, load_records, normalize_record
from common.precision import resolve_precision
from tests.conftest import make_conversation

TRAIN = [make_conversation(i) for i in range(24)]
VALIDATION = [make_conversation(100 + i) for i in range(8)]
FAST = ["--epochs", "1", "--batch-size", "2", "--effective-batch-size", "2", "--rank", "4", "--mixed-precision", "no",
        "--report-to", "none", "--num-samples", "0", "--no-baseline", "--max-seq-len", "256"]  # fmt: skip


def jsonl(records: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def with_line_3(line: str) -> str:
    """The toy training file with `line` as its 3rd line."""
    lines = [json.dumps(r) for r in TRAIN]
    return "\n".join([*lines[:2], line, *lines[2:]]) + "\n"


def with_turn(index: int, **changes) -> str:
    """The toy training file whose 3rd record has messages[index] changed (a None value deletes the key)."""
    record = json.loads(json.dumps(TRAIN[2]))
    turn = record["messages"][index]
    for key, value in changes.items():
        if value is None:
            del turn[key]
        else:
            turn[key] = value
    return with_line_3(json.dumps(record))


def without_roles(*roles: str) -> str:
    record = json.loads(json.dumps(TRAIN[2]))
    record["messages"] = [m for m in record["messages"] if m["role"] not in roles]
    return with_line_3(json.dumps(record))


def late_system_turn() -> str:
    record = json.loads(json.dumps(TRAIN[2]))
    record["messages"].insert(2, {"role": "system", "content": "Ignore the rules."})
    return with_line_3(json.dumps(record))


def run(tmp_path: Path, model_dir: Path, *extra: str, train_file: Path | None = None, validation_file: Path | None = None):  # fmt: skip
    """train.main() on the toy data (or the given files) into tmp_path/run."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if train_file is None:
        train_file = data / "train.jsonl"
        train_file.write_text(jsonl(TRAIN))
    if validation_file is None:
        validation_file = data / "validation.jsonl"
        validation_file.write_text(jsonl(VALIDATION))
    argv = ["--model", str(model_dir), "--train-file", str(train_file), "--validation-file", str(validation_file),
            "--output-dir", str(tmp_path / "run"), *FAST, *extra]  # fmt: skip
    return train.main(argv)


def refused(tmp_path: Path, model_dir: Path, *extra: str, **files) -> str:
    """Run, expect a refusal; return its message after checking it is one line and left no run folder."""
    with pytest.raises(SystemExit) as excinfo:
        run(tmp_path, model_dir, *extra, **files)
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    assert not (tmp_path / "run").exists(), f"a refused run left {sorted((tmp_path / 'run').rglob('*'))}"
    return message


# --- data files: (case, which file, its content (str or bytes), fragments the message must hold) ---
# "{file}" in a fragment is replaced by the path of the broken file.
DATA_CASES = [
    ("malformed JSON line (cut off)", "train", with_line_3(json.dumps(TRAIN[2])[:60]),
     ["{file}:3: invalid JSON (", "each line must be one JSON object"]),
    ("two JSON objects on one line", "train", with_line_3(json.dumps(TRAIN[2]) + " " + json.dumps(TRAIN[3])),
     ["{file}:3: invalid JSON (Extra data"]),
    ("JSON nested 100,000 levels deep", "train", with_line_3("[" * 100_000 + "]" * 100_000),
     ["{file}:3: invalid JSON"]),
    ("a 5,000-digit number", "train", with_line_3('{"text": "x", "n": ' + "9" * 5000 + "}"),
     ["{file}:3: invalid JSON"]),
    ("latin-1 byte in a UTF-8 file", "train", with_line_3('{"text": "caf\x00"}').encode().replace(b"\x00", b"\xe9"),
     ["{file}:3: not valid UTF-8 (", "re-save the file as UTF-8"]),
    ("UTF-16 encoded file", "train", jsonl(TRAIN).encode("utf-16"),
     ["{file}:1: not valid UTF-8 (", "re-save the file as UTF-8"]),
    ("turn without a role", "train", with_turn(1, role=None),
     ["{file}:3: messages[1].role is None; expected one of system, user, assistant"]),
    ("unknown role 'bot'", "train", with_turn(2, role="bot"),
     ["{file}:3: messages[2].role is 'bot'; expected one of system, user, assistant"]),
    ("empty turn", "train", with_turn(3, content=""),
     ["{file}:3: messages[3].content is empty; remove the turn or fill it in"]),
    ("whitespace-only turn", "train", with_turn(4, content=" \n\t "),
     ["{file}:3: messages[4].content is empty"]),
    ("turn content is a list", "train", with_turn(1, content=["a", "b"]),
     ["{file}:3: messages[1].content must be a string, got list"]),
    ("turn without content", "train", with_turn(1, content=None),
     ["{file}:3: messages[1].content must be a string, got NoneType"]),
    ("conversation with no assistant turn", "train", without_roles("assistant"),
     ["{file}:3: no assistant turn; nothing to train on"]),
    ("system turn after the first turn", "train", late_system_turn(),
     ["{file}:3: messages[2] is a system turn; only messages[0] may be system"]),
    ("record is a JSON list", "train", with_line_3(json.dumps(TRAIN[2]["messages"])),
     ["{file}:3: expected a JSON object, got list"]),
    ("record without messages/prompt/text", "train", with_line_3(json.dumps({"id": "x", "turns": []})),
     ["{file}:3: missing field 'messages' (or 'conversations', 'prompt'+'completion', 'instruction'+'output', "
      "or 'text'); found ['id', 'turns']"]),
    ("empty messages list", "train", with_line_3(json.dumps({"messages": []})),
     ["{file}:3: 'messages' must be a non-empty list"]),
    ("prompt without completion", "train", with_line_3(json.dumps({"prompt": "Applicant is 40."})),
     ["{file}:3: 'completion' must be a non-empty string"]),
    ("bad line in the validation file", "validation", jsonl(VALIDATION[:4]) + '{"messages": "hi"}\n',
     ["{file}:5: 'messages' must be a non-empty list"]),
    ("empty training file", "train", "", ["{file}: no records; the file is empty"]),
    ("training file of blank lines", "train", "\n  \n\n", ["{file}: no records; the file is empty"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "split", "content", "fragments"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file_is_refused_naming_file_line_and_field(tiny_model_dir, tmp_path, case, split, content, fragments, record_property):  # fmt: skip
    """Bad data file refused with file:line, field and fix; no run folder"""
    bad = tmp_path / f"bad_{split}.jsonl"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = refused(tmp_path, tiny_model_dir, **{f"{split}_file": bad})
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert message.startswith(f"error: {bad}"), message
    for fragment in fragments:
        assert fragment.format(file=bad) in message


def test_missing_and_unsupported_files_are_refused(tiny_model_dir, tmp_path, record_property):
    """Missing training file and a .txt file: refused, naming the file and the fix; no run folder"""
    missing = tmp_path / "nope" / "train.jsonl"
    first = refused(tmp_path, tiny_model_dir, train_file=missing)
    assert first == f"error: {missing}: file not found; generate the dataset with `python data/generate.py`"
    text = tmp_path / "train.txt"
    text.write_text(jsonl(TRAIN))
    second = refused(tmp_path, tiny_model_dir, train_file=text)
    assert second == f"error: {text}: unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"
    record_property("observed", f"{first} / {second}".replace(str(tmp_path), "<tmp>"))


def test_train_file_empty_after_length_filtering_is_refused(tiny_model_dir, tmp_path, record_property):
    """Every training conversation longer than --max-seq-len (train file empty after filtering): refused"""
    message = refused(tmp_path, tiny_model_dir, "--max-seq-len", "16")
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    train_file = tmp_path / "data" / "train.jsonl"
    assert message == (
        f"error: {train_file}: no example is left after dropping those longer than --max-seq-len 16; raise it"
    )


def test_validation_split_larger_than_training_is_refused(tiny_model_dir, tmp_path, record_property):
    """--validation-file (8) larger than --train-file (4), both given: refused as probably swapped, naming the flags"""
    small = tmp_path / "small_train.jsonl"
    small.write_text(jsonl(TRAIN[:4]))
    message = refused(tmp_path, tiny_model_dir, train_file=small)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    validation = tmp_path / "data" / "validation.jsonl"
    assert message == (
        f"error: --validation-file {validation} has more examples (8) than --train-file {small} (4); the files may "
        "be swapped: exchange the values of --train-file and --validation-file, or pass a smaller --validation-file"
    )


def test_bom_and_crlf_files_train_as_given(tiny_model_dir, tmp_path, record_property):
    """JSONL with a UTF-8 byte-order mark (Notepad, Excel) and CRLF line ends (Windows): trained as given"""
    bom_crlf = tmp_path / "windows.jsonl"
    bom_crlf.write_bytes(b"\xef\xbb\xbf" + jsonl(TRAIN[:12]).replace("\n", "\r\n").encode())
    summary = run(tmp_path, tiny_model_dir, "--max-steps", "1", train_file=bom_crlf)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["status"] == "max_steps" and config["derived"]["train_examples"] == 12
    record_property("observed", "12 examples read from a BOM + CRLF file; 1 step trained")


def test_overlong_conversations_are_truncated_or_dropped_and_reported(tiny_model_dir, tmp_path, record_property):
    """Conversations longer than --max-seq-len: oldest turns dropped, or the example dropped; both counted"""
    long_history = json.loads(json.dumps(TRAIN[0]))
    long_history["id"] = "long-history"
    long_history["messages"][1]["content"] += " The applicant also reports hobbies." * 40
    long_reply = json.loads(json.dumps(TRAIN[1]))
    long_reply["id"] = "long-reply"
    long_reply["messages"] = [long_reply["messages"][0], long_reply["messages"][3], long_reply["messages"][4]]
    long_reply["messages"][-1]["content"] = "Rule L-1 applies. " * 60 + long_reply["messages"][-1]["content"]
    data = tmp_path / "long_train.jsonl"
    data.write_text(jsonl([long_history, long_reply, *TRAIN[2:12]]))
    run(tmp_path, tiny_model_dir, "--max-seq-len", "128", "--max-steps", "1", "--save-every", "0", train_file=data)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    stats = config["derived"]["tokenize_stats"]["train"]
    assert stats["truncated_history"] == 1 and stats["dropped_overlong"] == 1 and stats["dropped_ids"] == ["long-reply"]
    assert config["derived"]["train_examples"] == 11
    line = next(line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "train /" in line)
    assert "11 train / 8 validation examples (1 truncated, 1 dropped > 128 tokens)" in line
    record_property("observed", line.split(" | ", 1)[1])


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path, record_property):
    """U+2028, U+2029 and NEL inside a reply (JSON written with ensure_ascii=False) load as data, not as line breaks"""
    records = [json.loads(json.dumps(r)) for r in TRAIN[:3]]
    records[1]["messages"][-1]["content"] = "Line one\u2028line two\u2029line three\x85end\nDECISION: approve"
    path = tmp_path / "unicode.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    try:
        loaded = load_records(path)
    except DataError as err:
        record_property("observed", str(err).replace(str(tmp_path), "<tmp>"))
        raise
    assert [r["_line"] for r in loaded] == [1, 2, 3]
    assert loaded[1]["messages"][-1]["content"] == records[1]["messages"][-1]["content"]
    record_property("observed", "3 records, lines 1-3, reply text intact")


# --- flags: (case, extra flags, the exact message or fragments) ---
FLAG_CASES = [
    ("--rank 0", ["--rank", "0"], "error: --rank must be >= 1, got 0"),
    ("negative --lr", ["--lr", "-0.0002"], "error: --lr must be > 0, got -0.0002"),
    ("--lr 0", ["--lr", "0"], "error: --lr must be > 0, got 0.0"),
    ("--alpha 0", ["--alpha", "0"], "error: --alpha must be > 0, got 0.0"),
    ("negative --seed", ["--seed", "-1"], "error: --seed must be in [0, 2**32), got -1"),
    ("--dropout 1", ["--dropout", "1"], "error: --dropout must be in [0, 1), got 1.0"),
    ("--epochs 0", ["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    ("--max-seq-len 8", ["--max-seq-len", "8"], "error: --max-seq-len must be >= 16, got 8"),
    ("--warmup-ratio 1", ["--warmup-ratio", "1"], "error: --warmup-ratio must be in [0, 1), got 1.0"),
    ("--batch-size 0", ["--batch-size", "0"], "error: --batch-size and --eval-batch-size must be >= 1"),
    ("negative --save-every", ["--save-every", "-1"], "--save-every"),
    ("effective batch not divisible by the batch size", ["--batch-size", "3", "--effective-batch-size", "16"],
     "error: --effective-batch-size 16 is not divisible by --batch-size 3 x 1 process(es); change one of them"),
    ("--grad-accum contradicting --effective-batch-size", ["--grad-accum", "3", "--effective-batch-size", "16"],
     "error: --grad-accum 3 x --batch-size 2 x 1 process(es) must be >= 1 and equal --effective-batch-size 16; give only one of them"),
    ("--grad-accum 0", ["--grad-accum", "0"], "--grad-accum 0 x --batch-size 2 x 1 process(es) must be >= 1"),
    ("unknown target module for this architecture", ["--target-modules", "q_proj,qkv_proj"],
     "error: --target-modules: qkv_proj not found in this model; linear layers are: "
     "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("--model folder that does not exist", ["--model", "/nonexistent/model"], "error: model folder /nonexistent/model does not exist"),
    ("--resume-from a folder that does not exist", ["--resume-from", "/nonexistent/step_000010"],
     "error: --resume-from /nonexistent/step_000010: no such checkpoint folder; use 'latest' or a step_XXXXXX folder"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "extra", "expected"), FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_invalid_flag_is_refused_naming_the_flag(tiny_model_dir, tmp_path, case, extra, expected, record_property):
    """Invalid flag refused with a message naming it; no run folder"""
    message = refused(tmp_path, tiny_model_dir, *extra)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    if expected.startswith("error: "):
        assert message == expected
    else:
        assert expected in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [(["--rank", "abc"], "argument --rank: invalid int value: 'abc'"),
     (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
     (["--quantization", "int3"], "argument --quantization: invalid choice: 'int3'")],
    ids=["--rank abc", "--mixed-precision fp8", "--quantization int3"],
)  # fmt: skip
def test_malformed_flag_value_is_refused_by_the_parser(tiny_model_dir, tmp_path, capsys, extra, expected, record_property):  # fmt: skip
    """Malformed flag value refused by argparse (exit status 2) naming the flag; no run folder"""
    with pytest.raises(SystemExit) as excinfo:
        run(tmp_path, tiny_model_dir, *extra)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    record_property("observed", "error: " + error.split("error: ", 1)[-1])  # without argparse's program name
    assert excinfo.value.code == 2 and expected in error
    assert not (tmp_path / "run").exists()


def test_config_file_with_unknown_key_is_refused(tiny_model_dir, tmp_path, record_property):
    """--config file with a misspelled key: refused naming the file and the key"""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nlearning_rate: 2e-4\n")
    message = refused(tmp_path, tiny_model_dir, "--config", str(config))
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert message == f"error: --config {config}: unknown key 'learning_rate'; see --help for the flags"


def test_qlora_without_bitsandbytes_is_refused(tiny_model_dir, tmp_path, monkeypatch, record_property):
    """--quantization nf4 without bitsandbytes installed: refused with the pip command"""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))  # fmt: skip
    message = refused(tmp_path, tiny_model_dir, "--quantization", "nf4")
    record_property("observed", message)
    assert message == "error: --quantization nf4 needs bitsandbytes: pip install 'bitsandbytes>=0.46'"


def test_resume_with_nothing_to_resume_leaves_no_run_folder(tiny_model_dir, tmp_path, record_property):
    """--resume-from latest into a new folder: refused before the run folder is created"""
    message = refused(tmp_path, tiny_model_dir, "--resume-from", "latest")
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert "no complete checkpoint" in message


def test_resume_of_a_run_killed_before_its_first_checkpoint_says_what_to_do(tiny_model_dir, tmp_path, record_property):
    """--resume-from latest on a run with no checkpoint yet: the message offers --overwrite, which works"""
    output = tmp_path / "run"
    output.mkdir()
    (output / "config.json").write_text('{"args": {}}\n')  # what a run killed before its first checkpoint leaves
    with pytest.raises(SystemExit) as excinfo:
        run(tmp_path, tiny_model_dir, "--resume-from", "latest")
    message = str(excinfo.value)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert "no complete checkpoint" in message and "--overwrite" in message
    assert (output / "config.json").read_text() == '{"args": {}}\n', "the refused resume rewrote config.json"


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(
    ("gpu", "bf16_ok", "requested", "expected", "warning"),
    [(True, False, "bf16", "fp16", "bf16 is not supported on this GPU; falling back to fp16 with loss scaling"),
     (True, False, "auto", "fp16", None),
     (True, True, "bf16", "bf16", None),
     (False, False, "bf16", "no", "this CPU has no bf16 support; training in fp32")],
    ids=["bf16 on a GPU without bf16 (T4)", "auto on a GPU without bf16", "bf16 on an Ampere+ GPU", "bf16 on a CPU without bf16"],
)  # fmt: skip
def test_unsupported_precision_falls_back_with_a_warning(monkeypatch, gpu, bf16_ok, requested, expected, warning, record_property):  # fmt: skip
    """Mixed precision the hardware lacks: falls back (bf16 -> fp16 on GPU, fp32 on CPU) with a warning"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0) if bf16_ok else (7, 5))
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: bf16_ok)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    logger = logging.getLogger(f"test-precision-{requested}-{gpu}")
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        device = torch.device("cuda" if gpu else "cpu")
        assert resolve_precision(requested, device, measure_peak=False, logger=logger).precision == expected
    finally:
        logger.removeHandler(handler)
    if warning:
        assert any(warning in m for m in handler.messages), handler.messages
    else:
        assert not handler.messages
    record_property("observed", f"{requested} -> {expected}" + (f"; {handler.messages[0]}" if handler.messages else ""))


# --- property-based: the loader over arbitrary JSON-ish input ---

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)  # fmt: skip
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=12)  # fmt: skip
roles = st.sampled_from([*VALID_ROLES, "bot", "", "User"]) | json_values
contents = st.sampled_from(["", "  ", "\n", "Applicant is 40.", "a\u2028b", "x\x85y"]) | st.text(max_size=20) | json_values  # fmt: skip
turns = st.fixed_dictionaries({}, optional={"role": roles, "content": contents}) | json_values
speakers = st.sampled_from(["human", "gpt", "system", "user", "assistant", "bot", ""]) | json_values
sharegpt_turns = st.fixed_dictionaries({}, optional={"from": speakers, "value": contents}) | json_values
good_turns = st.fixed_dictionaries({"role": st.sampled_from(VALID_ROLES), "content": st.text(min_size=1, max_size=20)})
records = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(good_turns, min_size=1, max_size=4)}, optional={"id": json_values}),
    st.fixed_dictionaries({"messages": st.lists(turns, max_size=4) | json_values}, optional={"text": json_values}),
    st.fixed_dictionaries(
        {}, optional={"prompt": contents, "completion": contents, "text": contents, "x": json_values}
    ),
    st.fixed_dictionaries({"conversations": st.lists(sharegpt_turns, max_size=4) | json_values}),
    st.fixed_dictionaries(
        {}, optional={"instruction": contents, "input": contents, "output": contents, "system": contents}
    ),
    json_values,
)
PROPERTY_SETTINGS = settings(max_examples=250, deadline=None, database=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


def expected_valid(raw: object) -> bool:
    """The record rules of common/data.py written out independently (the test oracle)."""
    if not isinstance(raw, dict):
        return False
    if raw.get("messages") is not None:
        turns_ = raw["messages"]
        if not isinstance(turns_, list) or not turns_:
            return False
        for i, turn in enumerate(turns_):
            if not isinstance(turn, dict) or turn.get("role") not in VALID_ROLES:
                return False
            if not isinstance(turn.get("content"), str) or not turn["content"].strip():
                return False
            if turn["role"] == "system" and i:
                return False
        return any(turn["role"] == "assistant" for turn in turns_)
    if raw.get("conversations") is not None:  # ShareGPT
        turns_ = raw["conversations"]
        if not isinstance(turns_, list) or not turns_:
            return False
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        for i, turn in enumerate(turns_):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or turn["from"] not in roles:
                return False
            if not isinstance(turn.get("value"), str) or not turn["value"].strip():
                return False
            if roles[turn["from"]] == "system" and i:
                return False
        return any(roles[turn["from"]] == "assistant" for turn in turns_)
    if raw.get("prompt") is not None or raw.get("completion") is not None:
        return all(isinstance(raw.get(k), str) and raw[k].strip() for k in ("prompt", "completion"))
    if raw.get("instruction") is not None or raw.get("output") is not None:  # Alpaca
        filled = all(isinstance(raw.get(k), str) and raw[k].strip() for k in ("instruction", "output"))
        return bool(filled) and (raw.get("input") is None or isinstance(raw["input"], str))
    if raw.get("text") is not None:
        return isinstance(raw["text"], str) and bool(raw["text"].strip())
    return False


def assert_normalized(record: dict, raw: dict) -> None:
    """What tokenize_records relies on: "messages" present means a valid chat, else a non-empty "text"."""
    if "messages" in record:
        assert isinstance(record["messages"], list), f"'messages' is {record['messages']!r} in {record!r}"
        assert all(set(turn) == {"role", "content"} for turn in record["messages"])
        assert any(turn["role"] == "assistant" for turn in record["messages"])
        if raw.get("messages") is not None:
            assert [t["content"] for t in record["messages"]] == [t["content"] for t in raw["messages"]]
        elif raw.get("conversations") is not None:
            assert [t["content"] for t in record["messages"]] == [t["value"] for t in raw["conversations"]]
        elif raw.get("prompt") is not None or raw.get("completion") is not None:
            assert record["messages"][0]["content"] == raw["prompt"]
        else:  # Alpaca: the instruction opens the user turn, the output is the reply
            user = next(t for t in record["messages"] if t["role"] == "user")
            assert user["content"].startswith(raw["instruction"]) and record["messages"][-1]["content"] == raw["output"]
    else:
        assert isinstance(record["text"], str) and record["text"].strip()


@PROPERTY_SETTINGS
@given(raw=records)
@example(raw={"messages": None, "text": "Term life covers a fixed period."})
def test_normalize_record_returns_a_valid_record_or_a_data_error(raw):
    """Property (hypothesis): any JSON value as a record is normalized or refused with DataError naming its line"""
    try:
        record = normalize_record(raw, "train.jsonl:7")
    except DataError as err:
        assert str(err).startswith("train.jsonl:7: ")
        assert not expected_valid(raw), f"valid record refused: {err}"
    else:
        assert expected_valid(raw), f"invalid record accepted: {raw!r}"
        assert_normalized(record, raw)


lines = st.one_of(
    records.map(lambda r: json.dumps(r, ensure_ascii=False)),  # how many tools write non-English text
    records.map(json.dumps),
    st.sampled_from(["", "   ", "{", "[1,", "null", '"text"', "{'a': 1}", "\t"]),
    st.text(max_size=15),
)


@PROPERTY_SETTINGS
@given(file_lines=st.lists(lines, max_size=6))
@example(file_lines=['{"messages": [{"role": "user", "content": "a\u2028b"}, {"role": "assistant", "content": "c"}]}'])
def test_load_records_names_the_first_bad_line_or_returns_every_record(file_lines):
    """Property (hypothesis): any JSONL file loads completely or raises DataError naming file:line of its first bad line"""
    expected_lines, first_bad = [], None
    for number, line in enumerate(file_lines, start=1):
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark opening the file is not data
        if not line.strip() or "\n" in line or "\r" in line:
            continue
        try:
            valid = expected_valid(json.loads(line))
        except ValueError:
            valid = False
        if not valid:
            first_bad = number
            break
        expected_lines.append(number)
    # one line per list item: drop items that themselves hold a line break, keep numbering honest
    file_lines = [line if "\n" not in line and "\r" not in line else "" for line in file_lines]
    folder = Path(tempfile.mkdtemp())
    try:
        path = folder / "data.jsonl"
        path.write_text("".join(line + "\n" for line in file_lines), encoding="utf-8")
        try:
            loaded = load_records(path)
        except DataError as err:
            if first_bad is not None:
                assert str(err).startswith(f"{path}:{first_bad}: "), (file_lines, str(err))
            else:
                assert not expected_lines and str(err) == f"{path}: no records; the file is empty", str(err)
        else:
            assert first_bad is None, f"line {first_bad} should have been refused"
            assert [r["_line"] for r in loaded] == expected_lines
    finally:
        shutil.rmtree(folder)


def test_text_record_with_null_messages_is_trained_as_text(tmp_path, default_tokenizer, record_property):
    """A text row with "messages": null (mixed CSV/parquet/JSONL schemas) is trained as text, not crashed on"""
    from common.data import tokenize_records

    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl([TRAIN[0], {"messages": None, "text": "Term life covers a fixed period."}]))
    records = load_records(path)
    examples, stats = tokenize_records(records, default_tokenizer, 256)
    assert stats.kept == 2 and examples[1]["n_trained"] == len(examples[1]["input_ids"])
    record_property("observed", f"{stats.kept} examples; the text row has every token trained")
