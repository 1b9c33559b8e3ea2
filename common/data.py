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


def _read_raw_records(path: Path) -> Iterator[tuple[int, object]]:
    """Yield (line_or_row_number, raw record) pairs; numbers are 1-based as an editor shows them."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None
        # split on "\n" only: str.splitlines() also breaks at U+2028, U+2029 and NEL, which JSON
        # allows raw inside strings (json.dumps(..., ensure_ascii=False) writes them that way)
        for number, line in enumerate(text.split("\n"), start=1):
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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None
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
