"""common.data: validation messages, assistant-only label masks, overlong policy, batching."""

from __future__ import annotations

import json

import pytest
import torch

from common.data import (
    IGNORE_INDEX,
    DataError,
    LengthGroupedBatchSampler,
    collate_batch,
    hold_out_validation,
    load_records,
    read_run_record,
    tokenize_messages,
    tokenize_records,
)

CONVERSATION = [
    {"role": "system", "content": "You are an underwriting assistant."},
    {"role": "user", "content": "Term life, age 42, 500k, non-smoker."},
    {"role": "assistant", "content": "What is the applicant's BMI?"},
    {"role": "user", "content": "27.5"},
    {"role": "assistant", "content": "Standard class applies.\nDECISION: approve | CLASS: standard | RULES: L-8"},
]


def trained_text(tokenizer, example: dict) -> str:
    """Decode only the tokens whose label is trained."""
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_only_assistant_replies_and_their_end_of_turn_are_trained(default_tokenizer):
    example = tokenize_messages(default_tokenizer, CONVERSATION)
    eot = default_tokenizer.eos_token
    assert eot == "<|im_end|>"
    expected = f"{CONVERSATION[2]['content']}{eot}{CONVERSATION[4]['content']}{eot}"
    assert trained_text(default_tokenizer, example) == expected
    # labels equal input ids wherever trained (no shift here; the loss shifts)
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (IGNORE_INDEX, token)
    # no system/user token is trained: every trained run lies inside an assistant reply
    untrained = default_tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == -100])
    assert "underwriting assistant" in untrained and "non-smoker" in untrained and "27.5" in untrained
    assert "BMI" not in untrained and "DECISION" not in untrained


def test_role_headers_and_newline_after_end_of_turn_are_not_trained(default_tokenizer):
    example = tokenize_messages(default_tokenizer, CONVERSATION)
    tokens = default_tokenizer.convert_ids_to_tokens(example["input_ids"])
    for i, token in enumerate(tokens):
        if token == "<|im_start|>" or (i > 0 and tokens[i - 1] == "<|im_start|>"):
            assert example["labels"][i] == IGNORE_INDEX
    last_eot = max(i for i, t in enumerate(tokens) if t == "<|im_end|>")
    assert example["labels"][last_eot] != IGNORE_INDEX
    assert all(label == IGNORE_INDEX for label in example["labels"][last_eot + 1 :])


def test_record_without_assistant_turn_is_rejected(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: no assistant turn"):
        load_records(path)


BAD_FILES = [
    ("bad json", '{"messages": [\n', ".jsonl", r":1: invalid JSON"),
    ("missing messages", '{"id": 1}\n', ".jsonl", r":1: missing field 'messages'"),
    (
        "unknown role",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistent", "content": "b"}]}\n',
        ".jsonl",
        r":1: messages\[1\]\.role is 'assistent'; expected one of system, user, assistant",
    ),
    (
        "empty content",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}\n',
        ".jsonl",
        r":1: messages\[1\]\.content is empty",
    ),
    (
        "non-string content",
        '{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}]}\n',
        ".jsonl",
        r":1: messages\[0\]\.content must be a string, got int",
    ),
    ("empty file", "", ".jsonl", r"no records; the file is empty"),
    ("wrong extension", "hello", ".txt", r"unsupported file type '\.txt'"),
    ("second line bad", '{"text": "ok"}\n{"messages": 3}\n', ".jsonl", r":2: 'messages' must be a non-empty list"),
    (
        "late system turn",
        '{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}]}\n',
        ".jsonl",
        r":1: messages\[1\] is a system turn; only messages\[0\] may be system",
    ),
]


@pytest.mark.parametrize(("name", "content", "suffix", "message"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_files_name_line_and_field(tmp_path, name, content, suffix, message):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as excinfo:
        load_records(path)
    assert str(path) in str(excinfo.value)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8"):
        load_records(path)


def test_prompt_completion_text_csv_and_parquet_are_accepted(tmp_path, default_tokenizer):
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "Quote?", "completion": "Refer."}) + "\n")
    (tmp_path / "t.json").write_text(json.dumps([{"text": "plain text"}]))
    (tmp_path / "c.csv").write_text('prompt,completion\n"Quote?","Refer."\n')
    import datasets

    datasets.Dataset.from_list([{"messages": CONVERSATION}]).to_parquet(str(tmp_path / "p.parquet"))
    pc = load_records(tmp_path / "pc.jsonl")[0]
    assert pc["messages"] == [{"role": "user", "content": "Quote?"}, {"role": "assistant", "content": "Refer."}]
    assert load_records(tmp_path / "c.csv")[0]["messages"] == pc["messages"]
    assert load_records(tmp_path / "p.parquet")[0]["messages"] == CONVERSATION
    text = load_records(tmp_path / "t.json")
    examples, _ = tokenize_records(text, default_tokenizer, 64)
    assert examples[0]["labels"] == examples[0]["input_ids"]  # plain text: every token trained


def test_overlong_history_is_truncated_from_the_left_and_final_reply_kept(default_tokenizer):
    long_turn = "word " * 300
    messages = [
        CONVERSATION[0],
        {"role": "user", "content": long_turn},
        {"role": "assistant", "content": "First reply."},
        {"role": "user", "content": "Short follow-up."},
        {"role": "assistant", "content": "Final reply.\nDECISION: decline | CLASS: n/a | RULES: L-1"},
    ]
    full = len(tokenize_messages(default_tokenizer, messages)["input_ids"])
    examples, stats = tokenize_records([{"messages": messages}], default_tokenizer, max_seq_len=100)
    assert full > 100 and stats.truncated_history == 1 and stats.dropped_overlong == 0
    assert len(examples[0]["input_ids"]) <= 100
    kept = default_tokenizer.decode(examples[0]["input_ids"])
    assert "Final reply." in kept and "First reply." not in kept and "underwriting assistant" in kept
    # a final exchange that alone exceeds the limit is dropped, never cut
    examples, stats = tokenize_records([{"messages": messages}], default_tokenizer, max_seq_len=30)
    assert examples == [] and stats.dropped_overlong == 1
    examples, stats = tokenize_records([{"messages": messages}], default_tokenizer, 100, overlong="drop")
    assert examples == [] and stats.dropped_overlong == 1


def test_collate_pads_right_and_never_trains_padding(default_tokenizer):
    examples, _ = tokenize_records([{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}], default_tokenizer, 512)
    batch = collate_batch(examples, default_tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape[1] % 8 == 0
    short = len(examples[1]["input_ids"])
    assert batch["attention_mask"][1, :short].all() and not batch["attention_mask"][1, short:].any()
    # pad id == end-of-turn id here: padding must still be untrained while the real <|im_end|> is trained
    assert default_tokenizer.pad_token_id == default_tokenizer.eos_token_id
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["labels"][1, :short] == default_tokenizer.eos_token_id).sum() == 1
    assert batch["labels"].dtype == torch.long


def test_length_grouped_sampler_is_deterministic_complete_and_grouped():
    lengths = [(i * 37) % 101 + 5 for i in range(50)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=4, seed=3, mega_batch_factor=4)
    first = sampler.batches()
    assert first == LengthGroupedBatchSampler(lengths, 4, seed=3, mega_batch_factor=4).batches()
    assert sorted(i for b in first for i in b) == list(range(50))
    assert len(first) == len(sampler) == 13 and all(len(b) == 4 for b in first[:-1]) and len(first[-1]) == 2
    sampler.set_epoch(1)
    assert sampler.batches() != first
    # grouping: padding waste is far below random batching
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in first)
    random_waste = sum(max(lengths[i] for i in range(s, s + 4)) * 4 - sum(lengths[s : s + 4]) for s in range(0, 48, 4))
    assert waste < random_waste / 2


# --- files as editors write them: byte-order mark, CRLF line ends ---


def test_every_text_reader_accepts_a_bom_and_crlf_line_ends(tmp_path):
    chat = {"messages": CONVERSATION[1:3]}
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + (json.dumps(chat) + "\r\n" + json.dumps(chat) + "\r\n").encode())
    (tmp_path / "a.json").write_bytes(bom + json.dumps([chat, chat], indent=2).replace("\n", "\r\n").encode())
    (tmp_path / "a.csv").write_bytes(bom + b'prompt,completion\r\n"Quote?","Refer."\r\n"Age 40?","Approve."\r\n')
    for name in ("a.jsonl", "a.json"):
        records = load_records(tmp_path / name)
        assert [r["messages"] for r in records] == [CONVERSATION[1:3]] * 2, name
    rows = load_records(tmp_path / "a.csv")
    assert [r["prompt"] for r in rows] == [
        "Quote?",
        "Age 40?",
    ]  # the header's first name is "prompt", not "\ufeffprompt"
    assert rows[1]["messages"][1]["content"] == "Approve."  # no stray "\r"
    assert [r["_line"] for r in load_records(tmp_path / "a.jsonl")] == [1, 2]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_other_encodings_keep_the_one_line_utf8_error(tmp_path, suffix):
    text = {
        ".jsonl": '{"text": "ok"}\n{"text": "café"}\n',
        ".json": '[{"text": "ok"},\n {"text": "café"}]\n',
        ".csv": "text\nok\ncafé\n",
    }[suffix]
    for encoding, line in (("latin-1", 2 if suffix != ".csv" else 3), ("utf-16", 1)):
        path = tmp_path / f"{encoding}{suffix}"
        path.write_bytes(text.encode(encoding))
        with pytest.raises(DataError) as excinfo:
            load_records(path)
        message = str(excinfo.value)
        assert message.startswith(f"{path}:{line}: not valid UTF-8 (") and message.endswith("re-save the file as UTF-8")
        assert "\n" not in message


# --- a held-out validation split of the user's own training file ---


def test_hold_out_validation_is_seeded_disjoint_and_reproducible():
    records = [{"id": f"r{i}", "text": f"example {i}"} for i in range(50)]
    train, validation, split = hold_out_validation(records, 0.1, seed=7, source="my.jsonl")
    assert len(validation) == 5 and len(train) == 45
    assert {r["id"] for r in train}.isdisjoint(r["id"] for r in validation)
    assert {r["id"] for r in train} | {r["id"] for r in validation} == {r["id"] for r in records}
    assert split == {
        "source": "my.jsonl", "source_examples": 50, "fraction": 0.1, "seed": 7, "train_examples": 45,
        "validation_examples": 5, "held_out_indices": split["held_out_indices"],
        "held_out_ids": [f"r{i}" for i in split["held_out_indices"]],
    }  # fmt: skip
    assert split["held_out_indices"] == sorted(split["held_out_indices"])
    assert hold_out_validation(records, 0.1, 7, "my.jsonl")[2] == split  # same seed, same split
    assert hold_out_validation(records, 0.1, 8, "my.jsonl")[2]["held_out_indices"] != split["held_out_indices"]
    # a recorded split is reused as it is (resume, evaluate.py), whatever fraction and seed are passed
    again = hold_out_validation(records, 0.5, 99, "my.jsonl", recorded=split)
    assert again[1] == validation and again[2] == split
    with pytest.raises(DataError, match=r"my\.jsonl has 49 records, but the run held out its validation split from 50"):
        hold_out_validation(records[:49], 0.1, 7, "my.jsonl", recorded=split)


def test_read_run_record_returns_none_for_what_a_run_folder_lacks(tmp_path):
    config = tmp_path / "config.json"
    assert read_run_record(config, "derived", "mixed_precision") is None  # no file
    config.write_text('{"derived": {"mixed_precision": "bf16"}, "dataset": [1]}')
    assert read_run_record(config, "derived", "mixed_precision") == "bf16"
    assert read_run_record(config, "derived", "attention") is None  # no key
    assert read_run_record(config, "dataset", "validation_split") is None  # not a mapping on the way
    config.write_text('{"derived": {"mixed_precision": "bf1')  # cut off
    assert read_run_record(config, "derived", "mixed_precision") is None


def test_hold_out_validation_keeps_at_least_one_example_each_side():
    records = [{"text": f"example {i}"} for i in range(8)]
    train, validation, split = hold_out_validation(records, 0.1, seed=1234, source="my.jsonl")
    assert len(validation) == 1 and len(train) == 7 and split["held_out_ids"] is None  # no ids: indices only
    assert len(hold_out_validation(records[:2], 0.01, 1, "my.jsonl")[1]) == 1
    with pytest.raises(DataError) as excinfo:
        hold_out_validation(records[:1], 0.1, 1, "my.jsonl")
    assert str(excinfo.value) == (
        "my.jsonl has 1 example(s): too few to hold out --validation-split 0.1 for validation and still train; "
        "add examples or pass --validation-file"
    )
    with pytest.raises(DataError, match=r"--validation-split must be between 0 and 1, got 1\.0"):
        hold_out_validation(records, 1.0, 1, "my.jsonl")
