"""Load, validate and tokenize chat data with assistant-only labels.

Accepted files: `.jsonl`, `.json` (a list of records or {"data": [...]}), `.csv`, `.parquet` (UTF-8,
with or without a byte-order mark, LF or CRLF), and folders written by `datasets.Dataset.save_to_disk`.
Accepted record shapes, checked in this order:
- `messages`: [{"role": "system"|"user"|"assistant", "content": str}, ...] (chat)
- `conversations` (ShareGPT): [{"from": "system"|"human"|"gpt", "value": str}, ...]
- `prompt` + `completion`: turned into one user turn and one assistant turn
- `instruction` (+ optional `input`) + `output` (Alpaca): one user turn and one assistant turn
- `text`: plain language modelling (every token is trained)

Labels are -100 on every system and user token (and the chat template's role headers, BOS and
padding); every token of each assistant reply, including its end-of-turn token, is trained. Most
templates (the default model's included) have no `{% generation %}` markers, so
`return_assistant_tokens_mask` does not work; `assistant_turns` derives the spans from the template
itself instead: it renders the conversation with and without each reply and finds where the reply
and the special token that closes it sit. The same function gives generation's stop token and the
exported generation_config (`end_of_turn_token_ids`), so they can never disagree with the mask.

Sequences longer than `max_seq_len` (policy `overlong="truncate_history"`, the default): the oldest
user/assistant exchanges after the system prompt are dropped until the conversation fits; if even
the final exchange does not fit, the example is dropped. The final assistant reply is never cut.
Policy "drop" drops every overlong example. The counts are returned so callers can report them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jinja2.exceptions import TemplateError
from torch.utils.data import BatchSampler

VALID_ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
DEFAULT_VALIDATION_SPLIT = 0.1  # share of a user's training file held out when no validation file is given
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


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
    elif path.is_dir() or suffix in (".csv", ".parquet"):
        import datasets  # heavy import, only when needed

        if path.is_dir():  # checked by load_records: a folder written by Dataset.save_to_disk
            dataset = datasets.load_from_disk(str(path))
        else:
            if suffix == ".csv":
                _read_utf8(path)  # the same one-line encoding error as JSONL; pandas itself skips a BOM
            builder = "csv" if suffix == ".csv" else "parquet"
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        for number, row in enumerate(dataset, start=1):
            for key in ("messages", "conversations"):
                if isinstance(row.get(key), str):  # chat stored as a JSON string in a CSV cell
                    try:
                        row = {**row, key: json.loads(row[key])}
                    except json.JSONDecodeError:
                        raise DataError(f"{path}: row {number}: '{key}' is not valid JSON") from None
            yield number, row
    else:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(SUPPORTED_SUFFIXES)}")


def _check_chat(turns: list, where: str, field: str, content_key: str) -> list[dict]:
    """Validate chat turns already holding our role names; return clean {role, content} dicts.

    Args:
        turns: [{"role", content_key}] dicts.
        where: "file:line" prefix for error messages.
        field: the record's field, named in the messages ("messages" or "conversations").
        content_key: the turn's text key as the file names it ("content" or ShareGPT's "value").
    """
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and '{content_key}'")
        role, content = turn.get("role"), turn.get(content_key)
        if role not in VALID_ROLES:
            raise DataError(f"{where}: {field}[{i}].role is {role!r}; expected one of {', '.join(VALID_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].{content_key} must be a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{where}: {field}[{i}].{content_key} is empty; remove the turn or fill it in")
        if role == "system" and i != 0:
            raise DataError(f"{where}: {field}[{i}] is a system turn; only {field}[0] may be system")
    if not any(turn["role"] == "assistant" for turn in turns):
        raise DataError(f"{where}: no assistant turn; nothing to train on (add the assistant reply)")
    return [{"role": turn["role"], "content": turn[content_key]} for turn in turns]


def _sharegpt_messages(turns: object, where: str) -> list[dict]:
    """ShareGPT's `conversations` ([{"from": "human"|"gpt"|"system", "value": str}]) as validated messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    renamed = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: conversations[{i}] must be an object with 'from' and 'value'")
        speaker = turn.get("from")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from is {speaker!r}; expected one of human, gpt, system")
        renamed.append({"role": role, "value": turn.get("value")})
    return _check_chat(renamed, where, "conversations", "value")


def _alpaca_messages(raw: dict, where: str) -> list[dict]:
    """Alpaca's `instruction` (+ optional `input`, `system`) and `output` as one user and one assistant turn."""
    for key in ("instruction", "output"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string (Alpaca records: instruction, input, output)")
    extra = raw.get("input")
    if extra is not None and not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
    # The usual Alpaca rendering: the input (the data the instruction is about) follows the instruction.
    user = raw["instruction"] if not (extra or "").strip() else f"{raw['instruction']}\n\n{extra}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": raw["output"]}]
    if isinstance(raw.get("system"), str) and raw["system"].strip():
        messages.insert(0, {"role": "system", "content": raw["system"]})
    return messages


def normalize_record(raw: object, where: str) -> dict:
    """Validate one record and return it as {"messages": [...]} (or {"text": str}) plus its extra fields.

    Shapes, detected in this order: `messages` (ours, OpenAI style), `conversations` (ShareGPT),
    `prompt` + `completion`, `instruction` + `output` (Alpaca), `text`.

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
        return {**raw, "messages": _check_chat(messages, where, "messages", "content")}
    if raw.get("conversations") is not None:
        return {**raw, "messages": _sharegpt_messages(raw["conversations"], where)}
    if raw.get("prompt") is not None or raw.get("completion") is not None:
        for key in ("prompt", "completion"):
            value = raw.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: '{key}' must be a non-empty string")
        messages = [{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": raw["completion"]}]
        return {**raw, "messages": messages}
    if raw.get("instruction") is not None or raw.get("output") is not None:
        return {**raw, "messages": _alpaca_messages(raw, where)}
    if raw.get("text") is not None:
        if not isinstance(raw["text"], str) or not raw["text"].strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        # a null "messages" (mixed-schema CSV/parquet rows) must not make tokenize_records treat it as chat
        return {key: value for key, value in raw.items() if key != "messages"}
    raise DataError(
        f"{where}: missing field 'messages' (or 'conversations', 'prompt'+'completion', 'instruction'+'output', "
        f"or 'text'); found {sorted(raw)[:8]}"
    )


def load_records(path: str | Path) -> list[dict]:
    """Read and validate every record of a data file.

    Args:
        path: a .jsonl/.json/.csv/.parquet file, or a folder written by `datasets.Dataset.save_to_disk`.

    Returns:
        Normalized records (see `normalize_record`), each with `_line` set to its line/row number.

    Raises:
        DataError: missing, empty, unsupported or invalid file, naming file, line and field.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(
                f"{path}: a DatasetDict folder (splits {splits}); pass one split's folder, e.g. {path}/train"
            )
        if not (path / "state.json").is_file():
            raise DataError(
                f"{path}: a folder, but not one written by datasets.Dataset.save_to_disk (no state.json); "
                f"pass a file ({', '.join(SUPPORTED_SUFFIXES)}) or such a folder"
            )
    elif not path.is_file():
        raise DataError(f"{path}: file not found; generate the dataset with `python data/generate.py`")
    elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
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


def dataset_sha256(path: str | Path) -> str:
    """Hex sha256 of a data file's bytes, or of a save_to_disk folder (each file's relative name and bytes).

    Args:
        path: what --train-file / --validation-file named.

    Returns:
        The digest recorded in config.json, so a run names exactly the data it saw.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


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


# Renders the template must handle to be trained on: a system prompt and two exchanges.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a careful underwriting assistant."},
    {"role": "user", "content": "Applicant is 40, wants term life."},
    {"role": "assistant", "content": "What is the applicant's BMI?"},
    {"role": "user", "content": "BMI is 24."},
    {"role": "assistant", "content": "Standard class applies."},
]
TEMPLATE_HINT = "pass --chat-template FILE with a Jinja chat template that does"


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # the template's raise_exception(), e.g. "roles must alternate"
        raise DataError(
            f"the chat template of {tokenizer.name_or_path} refuses this conversation ({err}); fix the record, "
            "or pass --chat-template FILE"
        ) from None


def _special_token_texts(tokenizer) -> list[str]:
    """Every special or added token's text, longest first (so "<|eot_id|>" is never cut short)."""
    texts = set(tokenizer.all_special_tokens) | {token.content for token in tokenizer.added_tokens_decoder.values()}
    return sorted((text for text in texts if text), key=len, reverse=True)


def _reply_end(rendered: str, start: int, reply: str, specials: list[str], model: str) -> tuple[int, str]:
    """Where the special token closing the reply that follows `start` in `rendered` ends, and that token.

    Raises:
        DataError: the reply text is not in the rendering, or no special token closes it.
    """
    reply = reply.strip()  # templates often `| trim` the content
    found = rendered.find(reply, start)
    if found < 0:
        raise DataError(
            f"the chat template of {model} rewrites the assistant reply text, so its tokens cannot be located; "
            f"{TEMPLATE_HINT} not"
        )
    position = found + len(reply)
    while position < len(rendered) and rendered[position].isspace():
        position += 1  # e.g. Llama 2's "reply </s>"
    marker = next((text for text in specials if rendered.startswith(text, position)), None)
    if marker is None:
        after = rendered[found + len(reply) : found + len(reply) + 20]
        raise DataError(
            f"the chat template of {model} ends an assistant turn with {after!r}, not with a special "
            f"end-of-turn token, so a model trained on it would never learn to stop; {TEMPLATE_HINT}"
        )
    return position + len(marker), marker


def assistant_turns(
    tokenizer, messages: list[dict], model_name: str | None = None
) -> tuple[str, list[tuple[int, int, str]]]:
    """Render a conversation and find each assistant reply and the end-of-turn token closing it.

    For the assistant turn i: `prefix` = turns before i with the generation prompt (exactly what
    the model is given at inference), `upto` = turns up to and including i. The reply is the text
    `upto` adds after `prefix`, up to and including the first special token after the reply text
    (<|im_end|>, <|eot_id|>, <end_of_turn>, </s>, <|end|>, ...); the template's newline after it is
    not trained. The template must be prefix-stable: the whole conversation must start with
    `prefix`, and render turn i the same way whether or not later turns follow.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: validated chat messages.
        model_name: the model as the user named it, for messages (default: the tokenizer's name_or_path).

    Returns:
        (rendered text, [(start, end, end-of-turn token)] character offsets, one per assistant turn).

    Raises:
        DataError: the template is not prefix-stable, rewrites replies, or closes a turn with no
            special token; the message names the model and says to pass --chat-template FILE.
    """
    model = model_name or tokenizer.name_or_path or "this model"
    text = _render(tokenizer, messages)
    specials = _special_token_texts(tokenizer)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # no prompt to render: its header would be trained, or a template's default system prompt
            raise DataError("the conversation opens with an assistant turn; start it with a user (or system) turn")
        prefix = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        stable = upto.startswith(prefix)
        if stable:
            end, marker = _reply_end(upto, len(prefix), message["content"], specials, model)
            # Compared up to the closing token only: Phi-3 appends an eos after the last turn alone.
            stable = text[:end] == upto[:end]
        if not stable:
            raise DataError(
                f"the chat template of {model} is not prefix-stable: it renders earlier turns differently once "
                f"later turns follow (e.g. it rewrites past replies), so labels cannot be masked; {TEMPLATE_HINT} not"
            )
        turns.append((len(prefix), end, marker))
    return text, turns


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and find the character span of every assistant reply (see `assistant_turns`).

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: validated chat messages.

    Returns:
        (rendered text, list of (start, end) character offsets: reply and its end-of-turn token).

    Raises:
        DataError: as `assistant_turns`.
    """
    text, turns = assistant_turns(tokenizer, messages)
    return text, [(start, end) for start, end, _marker in turns]


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at: the template's end-of-turn token, then eos when it differs.

    Found by `assistant_turns` on a probe conversation, the same algorithm that trains the token.

    Args:
        tokenizer: a tokenizer with a chat template.

    Returns:
        [end-of-turn id] or [end-of-turn id, eos id], e.g. [<|eot_id|>, <|end_of_text|>] for Llama 3.

    Raises:
        DataError: as `assistant_turns`.
    """
    _text, turns = assistant_turns(tokenizer, PROBE_CONVERSATION[1:3])
    ids = [tokenizer.convert_tokens_to_ids(turns[-1][2])]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def supports_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system message (Gemma's raises, Mistral v0.3's drops it).

    Args:
        tokenizer: a tokenizer with a chat template.

    Returns:
        True if a system prompt appears in the rendered conversation.
    """
    marker = "Follow the underwriting manual."
    probe = [{"role": "system", "content": marker}, *PROBE_CONVERSATION[1:3]]
    try:
        return marker in _render(tokenizer, probe)
    except Exception:  # raise_exception("System role not supported") arrives as jinja2's TemplateError
        return False


def tokenize_messages(tokenizer, messages: list[dict]) -> dict:
    """Tokenize one conversation with assistant-only labels.

    The template writes BOS itself when the model needs one, so the text is tokenized with
    `add_special_tokens=False` (another BOS from the tokenizer would make a sequence the model never
    sees at inference); a template that still yields two BOS in a row loses the first.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        messages: validated chat messages.

    Returns:
        {"input_ids": list[int], "labels": list[int]} with -100 outside assistant replies.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    bos = tokenizer.bos_token_id
    while bos is not None and len(input_ids) > 1 and input_ids[0] == input_ids[1] == bos:
        input_ids, offsets = input_ids[1:], offsets[1:]
    labels = [IGNORE_INDEX] * len(input_ids)
    span_index = 0
    for t, (start, _end) in enumerate(offsets):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[t] = input_ids[t]
    return {"input_ids": input_ids, "labels": labels}


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
            try:
                example = tokenize_messages(tokenizer, messages)
            except DataError as err:
                raise DataError(f"record at line {record.get('_line', index + 1)}: {err}") from None
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


def check_splits(
    train_file: str,
    train_examples: list,
    validation_file: str,
    val_examples: list,
    max_seq_len: int,
    both_given: bool = True,
) -> None:
    """Refuse empty splits and, when the user gave both files, a validation file larger than the training file.

    Args:
        train_file: --train-file.
        train_examples: its tokenized examples.
        validation_file: --validation-file, or a description of the split held out of the training file.
        val_examples: the validation examples.
        max_seq_len: --max-seq-len, named in the messages.
        both_given: the user passed both --train-file and --validation-file; only then can a larger
            validation set mean swapped files (a default or a held-out split is never the user's mistake).

    Raises:
        DataError: naming the file and what to do.
    """
    if not train_examples:
        raise DataError(
            f"{train_file}: no example is left after dropping those longer than --max-seq-len {max_seq_len}; raise it"
        )
    if not val_examples:
        raise DataError(
            f"{validation_file}: no example is left after dropping those longer than --max-seq-len {max_seq_len}"
        )
    if both_given and len(val_examples) > len(train_examples):
        raise DataError(
            f"--validation-file {validation_file} has more examples ({len(val_examples)}) than --train-file "
            f"{train_file} ({len(train_examples)}); the files may be swapped: exchange the values of --train-file "
            "and --validation-file, or pass a smaller --validation-file"
        )
