"""Load, validate and tokenize chat data with assistant-only labels.

Accepted files: `.jsonl`, `.json` (a list of records or {"data": [...]}), `.csv`, `.parquet`.
Accepted record shapes, checked in this order:
- `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...] (chat)
- `prompt` + `completion`: turned into one user turn and one assistant turn
- `text`: plain language modelling (every token is trained)

Labels are -100 on every system and user token (and the chat template's role headers); every token
of each assistant reply, including its end-of-turn token, is trained. We compute the mask from the
rendered chat template ourselves because most templates (the default model's included) have no
`{% generation %}` markers, so `return_assistant_tokens_mask` does not work.

Sequences longer than `max_seq_len` (policy `overlong="truncate_history"`, the default): the oldest
user/assistant exchanges after the system prompt are dropped until the conversation fits; if even
the final exchange does not fit, the example is dropped. The final assistant reply is never cut.
Policy "drop" drops every overlong example. The counts are returned so callers can report them.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import BatchSampler

VALID_ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_VALIDATION_SPLIT = 0.1  # share of a user's training file held out when no validation file is given


class DataError(ValueError):
    """A data file or record is invalid; the message names file, line and field and the fix."""


@dataclass
class TokenizeStats:
    """What happened while tokenizing one file."""

    kept: int = 0
    truncated_history: int = 0
    dropped_overlong: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    dropped_ids: list = field(default_factory=list)


def _read_utf8(path: Path) -> str:
    """Decode a text data file as UTF-8, accepting the byte-order mark many Windows tools write.

    Raises:
        DataError: the bytes are not UTF-8, naming the line of the first bad byte.
    """
    data = path.read_bytes()
    data = data.removeprefix(b"\xef\xbb\xbf")  # Notepad, Excel's "CSV UTF-8": the data after it is fine
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None


def _read_raw_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line_or_row_number, raw record) pairs; numbers are 1-based as an editor shows them."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = _read_utf8(path)
        # split on "\n" only: str.splitlines() also breaks at U+2028, U+2029 and NEL, which JSON
        # allows raw inside strings (json.dumps(..., ensure_ascii=False) writes them that way)
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")  # CRLF line ends (Windows editors)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}:{number}: invalid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object"
                ) from None
            except (ValueError, RecursionError) as err:  # a 5000-digit number, nesting deeper than ~1000
                raise DataError(
                    f"{path}:{number}: invalid JSON ({type(err).__name__}: {str(err)[:80]}); "
                    "each line must be one JSON object"
                ) from None
    elif suffix == ".json":
        text = _read_utf8(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); fix the file") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}: invalid JSON ({type(err).__name__}: {str(err)[:80]}); fix the file") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a JSON list of records (or {{'data': [...]}}); use .jsonl for one per line"
            )
        yield from enumerate(data, start=1)
    elif suffix in (".csv", ".parquet"):
        import datasets  # heavy import, only when needed

        if suffix == ".csv":
            _read_utf8(path)  # the same one-line encoding error as JSONL; pandas itself skips a BOM
        builder = "csv" if suffix == ".csv" else "parquet"
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        for number, row in enumerate(dataset, start=1):
            if isinstance(row.get("messages"), str):  # chat stored as a JSON string in a CSV cell
                try:
                    row = {**row, "messages": json.loads(row["messages"])}
                except json.JSONDecodeError:
                    raise DataError(f"{path}: row {number}: 'messages' is not valid JSON") from None
            yield number, row
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def normalize_record(raw: object, where: str) -> dict:
    """Validate one record and return it as {"messages": [...]} (or {"text": str}) plus its extra fields.

    Args:
        raw: the parsed record.
        where: "file:line" prefix for error messages.

    Returns:
        A dict with either `messages` (validated chat) or `text`, and the other original fields.

    Raises:
        DataError: naming the line, the field and what to do.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        messages = raw["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            role, content = message.get("role"), message.get("content")
            if role not in VALID_ROLES:
                raise DataError(f"{where}: messages[{i}].role is {role!r}; expected one of {', '.join(VALID_ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
            if not content.strip():
                raise DataError(f"{where}: messages[{i}].content is empty; remove the turn or fill it in")
            if role == "system" and i != 0:
                raise DataError(f"{where}: messages[{i}] is a system turn; only messages[0] may be system")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn; nothing to train on (add the assistant reply)")
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        return {**raw, "messages": clean}
    if raw.get("prompt") is not None or raw.get("completion") is not None:
        for key in ("prompt", "completion"):
            value = raw.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: '{key}' must be a non-empty string")
        messages = [{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": raw["completion"]}]
        return {**raw, "messages": messages}
    if raw.get("text") is not None:
        if not isinstance(raw["text"], str) or not raw["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        # a null "messages" (mixed-schema CSV/parquet rows) must not make tokenize_records treat it as chat
        return {key: value for key, value in raw.items() if key != "messages"}
    raise DataError(f"{where}: missing field 'messages' (or 'prompt'+'completion', or 'text'); found {sorted(raw)[:8]}")


def load_records(path: str | Path) -> list[dict]:
    """Read and validate every record of a data file.

    Args:
        path: a .jsonl/.json/.csv/.parquet file.

    Returns:
        Normalized records (see `normalize_record`), each with `_line` set to its line/row number.

    Raises:
        DataError: missing, empty, unsupported or invalid file, naming file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; generate the dataset with `python data/generate.py`")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    records = []
    for number, raw in _read_raw_records(path):
        record = normalize_record(raw, f"{path}:{number}")
        record["_line"] = number
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records; the file is empty")
    return records


def hold_out_validation(
    records: Sequence[dict], fraction: float, seed: int, source: str, recorded: dict | None = None
) -> tuple[list[dict], list[dict], dict]:
    """Split one data file into disjoint training and validation records (seeded, reproducible).

    Used when a user gives only their own training file: validating on unrelated data would pick
    `best/` and stop early for the wrong reasons. `round(fraction * n)` records (at least 1) are
    drawn with `random.Random(seed)`; both parts keep the file's order.

    Args:
        records: every record of the file, from `load_records`.
        fraction: share held out for validation, in (0, 1).
        seed: seeds the draw.
        source: the file's path, for messages and the record.
        recorded: the split a run already recorded in its config.json (`dataset.validation_split`):
            its held-out indices are reused as they are, so a resume or evaluate.py sees the same split.

    Returns:
        (train records, validation records, split record for config.json: source, sizes, fraction,
        seed, held-out indices (0-based positions in the file) and ids (when every record has one)).

    Raises:
        DataError: the file is too small to hold out a split and still train, or it no longer matches
            the recorded split.
    """
    if not 0 < fraction < 1:
        raise DataError(f"--validation-split must be between 0 and 1, got {fraction}")
    if recorded is not None:
        if recorded.get("source_examples") != len(records):
            raise DataError(
                f"{source} has {len(records)} records, but the run held out its validation split from "
                f"{recorded.get('source_examples')}; the file changed since training: restore it or pass --validation-file"
            )
        held_out = sorted(recorded["held_out_indices"])
        fraction, seed = recorded["fraction"], recorded["seed"]
    else:
        count = max(1, round(fraction * len(records)))
        if len(records) - count < 1:
            raise DataError(
                f"{source} has {len(records)} example(s): too few to hold out --validation-split {fraction} for "
                "validation and still train; add examples or pass --validation-file"
            )
        held_out = sorted(random.Random(seed).sample(range(len(records)), count))
    chosen = set(held_out)
    train = [record for i, record in enumerate(records) if i not in chosen]
    validation = [records[i] for i in held_out]
    ids = [record.get("id") for record in validation]
    split = {
        "source": str(source),
        "source_examples": len(records),
        "fraction": fraction,
        "seed": seed,
        "train_examples": len(train),
        "validation_examples": len(validation),
        "held_out_indices": held_out,
        "held_out_ids": ids if all(i is not None for i in ids) else None,
    }
    return train, validation, split


def read_recorded_split(config_file: Path) -> dict | None:
    """The held-out validation split a run recorded (`dataset.validation_split` of its config.json).

    Args:
        config_file: a run's config.json, or an export's training_args.json (same content).

    Returns:
        The split record from `hold_out_validation`, or None (no such file, or the run used a
        validation file of its own).
    """
    if not Path(config_file).is_file():
        return None
    try:
        config = json.loads(Path(config_file).read_text())
    except json.JSONDecodeError:
        return None
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset.get("validation_split") if isinstance(dataset, dict) else None


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of every assistant reply.

    Each span starts after the assistant header and ends right after the end-of-turn token
    (the template's trailing newline after it is not trained).

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: validated chat messages.

    Returns:
        (rendered text, list of (start, end) character offsets).

    Raises:
        DataError: the chat template is not prefix-stable, so masks cannot be computed safely.
    """
    text = _render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(prefix):
            raise DataError(
                "the chat template renders differently for a prefix of the conversation; cannot mask labels"
            )
        end = len(upto)
        eos = tokenizer.eos_token or ""
        eos_at = upto.rfind(eos, len(prefix)) if eos else -1
        if eos_at >= 0:
            end = eos_at + len(eos)
        spans.append((len(prefix), end))
    return text, spans


def tokenize_messages(tokenizer, messages: list[dict]) -> dict:
    """Tokenize one conversation with assistant-only labels.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        messages: validated chat messages.

    Returns:
        {"input_ids": list[int], "labels": list[int]} with -100 outside assistant replies.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [IGNORE_INDEX] * len(encoding["input_ids"])
    span_index = 0
    for t, (start, _end) in enumerate(encoding["offset_mapping"]):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[t] = encoding["input_ids"][t]
    return {"input_ids": list(encoding["input_ids"]), "labels": labels}


def tokenize_text(tokenizer, text: str) -> dict:
    """Tokenize plain text for language modelling; every token is trained, an eos is appended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def tokenize_records(
    records: Sequence[dict], tokenizer, max_seq_len: int, overlong: str = "truncate_history"
) -> tuple[list[dict], TokenizeStats]:
    """Tokenize records, applying the overlong policy (see module docstring).

    Args:
        records: normalized records from `load_records`.
        tokenizer: tokenizer with a chat template.
        max_seq_len: maximum tokens per example.
        overlong: "truncate_history" or "drop".

    Returns:
        (examples, stats). Each example: input_ids, labels, n_trained, index (position in records).

    Raises:
        DataError: unknown policy, or an example has no trained token left.
    """
    if overlong not in ("truncate_history", "drop"):
        raise DataError(f"overlong policy must be 'truncate_history' or 'drop', got {overlong!r}")
    stats = TokenizeStats()
    examples = []
    for index, record in enumerate(records):
        if "messages" in record:
            messages = record["messages"]
            example = tokenize_messages(tokenizer, messages)
            truncated = False
            while len(example["input_ids"]) > max_seq_len and overlong == "truncate_history":
                head = 1 if messages[0]["role"] == "system" else 0
                # drop the oldest exchange: up to and including the first assistant turn after head
                first_assistant = next(i for i in range(head, len(messages)) if messages[i]["role"] == "assistant")
                if first_assistant == len(messages) - 1:
                    break  # only the final exchange is left; never cut the final reply
                messages = messages[:head] + messages[first_assistant + 1 :]
                example = tokenize_messages(tokenizer, messages)
                truncated = True
        else:
            example = tokenize_text(tokenizer, record["text"])
            truncated = False
        if len(example["input_ids"]) > max_seq_len:
            stats.dropped_overlong += 1
            stats.dropped_ids.append(record.get("id", record.get("_line", index)))
            continue
        n_trained = sum(label != IGNORE_INDEX for label in example["labels"])
        if n_trained == 0:
            raise DataError(f"record at line {record.get('_line', index + 1)}: no trained token after tokenization")
        stats.truncated_history += int(truncated)
        stats.kept += 1
        stats.trained_tokens += n_trained
        stats.total_tokens += len(example["input_ids"])
        examples.append({**example, "n_trained": n_trained, "index": index})
    return examples, stats


def collate_batch(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad a list of tokenized examples into tensors.

    Args:
        examples: dicts with input_ids and labels (lists of ints).
        pad_token_id: id used for padding input_ids (labels are padded with -100, so a pad id equal
            to the end-of-turn id never hides a trained token).
        pad_to_multiple_of: round the padded length up (e.g. 8 for tensor cores), or None.

    Returns:
        {"input_ids", "attention_mask", "labels"} long tensors of shape (batch, length).
    """
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple_of:
        length = math.ceil(length / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class LengthGroupedBatchSampler(BatchSampler):
    """Shuffled batches of similar length, so little compute is spent on padding.

    Each epoch: shuffle all indices with (seed, epoch), cut them into mega-batches of
    `batch_size * mega_batch_factor`, sort each mega-batch by length, cut into batches, and shuffle
    the batch order. Deterministic for a given seed and epoch, so a resumed run sees the same order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_factor: int = 16):
        """Args: lengths: tokens per example; batch_size: examples per batch; seed: base seed."""
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.drop_last = False
        self.seed = seed
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """Return this epoch's batches (lists of example indices)."""
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_factor
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: self.lengths[i], reverse=True)
            batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
        # A short batch (the dataset size is not a multiple of batch_size) goes last, so every rank
        # of a multi-process run sees full batches until the very end.
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) != self.batch_size]
        rng.shuffle(full)
        return full + short

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the batches of the current epoch."""
        yield from self.batches()

    def __len__(self) -> int:
        """Number of batches per epoch."""
        return math.ceil(len(self.lengths) / self.batch_size)
