"""Load, validate and tokenize chat data with assistant-only labels.

Reads chat `messages`, ShareGPT `conversations`, `prompt` + `completion`, Alpaca `instruction` + `output` or `text` from
.jsonl, .json, .csv, .parquet and save_to_disk folders. Labels are -100 except on each assistant reply and its closing
end-of-turn token, found in the chat template (`assistant_turns`): few templates have `{% generation %}` markers.
"""

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
ROLES = {role: role for role in VALID_ROLES}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
# Renders the template must handle to be trained on: a system prompt and two exchanges.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Plan a three-day trip to Lisbon."},
    {"role": "assistant", "content": "What is your budget?"},
    {"role": "user", "content": "About 800 euros."},
    {"role": "assistant", "content": "Here is a plan within that budget."},
]
TEMPLATE_HINT = "pass --chat-template FILE with a Jinja chat template that does"


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
    """The file as UTF-8 text (a byte-order mark from Notepad or Excel dropped); bad bytes name their line."""
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8") from None


def _json_records(path: Path) -> Iterator[tuple[int, object]]:
    text = _read_utf8(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}); fix the file") from None
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}: invalid JSON ({type(err).__name__}: {str(err)[:80]}); fix the file") from None
        data = data["data"] if isinstance(data, dict) and isinstance(data.get("data"), list) else data
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a JSON list of records (or {{'data': [...]}}); use .jsonl for one per line"
            )
        yield from enumerate(data, start=1)
        return
    # split on "\n" only: str.splitlines() also breaks at U+2028, U+2029 and NEL, which JSON
    # allows raw inside strings (json.dumps(..., ensure_ascii=False) writes them that way)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.removesuffix("\r"))  # CRLF line ends (Windows editors)
        except (ValueError, RecursionError) as err:  # also a 5000-digit number, nesting deeper than ~1000
            decode_error = isinstance(err, json.JSONDecodeError)
            reason = f"{err.msg} at column {err.colno}" if decode_error else f"{type(err).__name__}: {str(err)[:80]}"
            raise DataError(f"{path}:{number}: invalid JSON ({reason}); each line must be one JSON object") from None
        yield number, record


def _dataset_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets  # heavy import, only when needed

    if path.is_file() and path.suffix.lower() == ".csv":
        _read_utf8(path)  # the same one-line encoding error as JSONL; pandas itself skips a BOM
    if path.is_dir():  # checked by load_records: a folder written by Dataset.save_to_disk
        dataset = datasets.load_from_disk(str(path))
    else:
        dataset = datasets.load_dataset(path.suffix.lower()[1:], data_files=str(path), split="train")
    for number, row in enumerate(dataset, start=1):
        for key in ("messages", "conversations"):
            if isinstance(row.get(key), str):  # chat stored as a JSON string in a CSV cell
                try:
                    row = {**row, key: json.loads(row[key])}
                except json.JSONDecodeError:
                    raise DataError(f"{path}: row {number}: '{key}' is not valid JSON") from None
        yield number, row


def _check_chat(turns: object, where: str, field: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    """Validate a record's turns ([{role_key: a key of `roles`, content_key: text}]) as {role, content} messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{field}' must be a non-empty list of {{{role_key}, {content_key}}} objects")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with '{role_key}' and '{content_key}'")
        name, content = turn.get(role_key), turn.get(content_key)
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            raise DataError(f"{where}: {field}[{i}].{role_key} is {name!r}; expected one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].{content_key} must be a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{where}: {field}[{i}].{content_key} is empty; remove the turn or fill it in")
        if role == "system" and i != 0:
            raise DataError(f"{where}: {field}[{i}] is a system turn; only {field}[0] may be system")
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: no assistant turn; nothing to train on (add the assistant reply)")
    return messages


def _require_text(raw: dict, keys: tuple[str, ...], where: str, hint: str = "") -> None:
    for key in keys:
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string{hint}")


def normalize_record(raw: object, where: str) -> dict:
    """One record as validated `messages` (or `text`) plus its other fields; errors name `where` ("file:line")."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        messages = _check_chat(raw["messages"], where, "messages", "role", "content", ROLES)
    elif raw.get("conversations") is not None:
        messages = _check_chat(raw["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
    elif raw.get("prompt") is not None or raw.get("completion") is not None:
        _require_text(raw, ("prompt", "completion"), where)
        messages = [{"role": "user", "content": raw["prompt"]}, {"role": "assistant", "content": raw["completion"]}]
    elif raw.get("instruction") is not None or raw.get("output") is not None:
        _require_text(raw, ("instruction", "output"), where, " (Alpaca records: instruction, input, output)")
        extra = raw.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
        # The usual Alpaca rendering: the input (the data the instruction is about) follows the instruction.
        user = raw["instruction"] if not (extra or "").strip() else f"{raw['instruction']}\n\n{extra}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": raw["output"]}]
        if isinstance(raw.get("system"), str) and raw["system"].strip():
            messages.insert(0, {"role": "system", "content": raw["system"]})
    elif raw.get("text") is not None:
        _require_text(raw, ("text",), where)
        # a null "messages" (mixed-schema CSV/parquet rows) must not make tokenize_records treat it as chat
        return {key: value for key, value in raw.items() if key != "messages"}
    else:
        raise DataError(
            f"{where}: missing field 'messages' (or 'conversations', 'prompt'+'completion', 'instruction'+'output', "
            f"or 'text'); found {sorted(raw)[:8]}"
        )
    return {**raw, "messages": messages}


def load_records(path: str | Path) -> list[dict]:
    """Every record of a data file or save_to_disk folder, normalized, with `_line` (1-based line or row)."""
    path = Path(path)
    suffixes = ", ".join(SUPPORTED_SUFFIXES)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise DataError(
                f"{path}: a DatasetDict folder (splits {splits}); pass one split's folder, e.g. {path}/train"
            )
        if not (path / "state.json").is_file():
            raise DataError(
                f"{path}: a folder, but not one written by datasets.Dataset.save_to_disk (no state.json); "
                f"pass a file ({suffixes}) or such a folder"
            )
    elif not path.is_file():
        raise DataError(f"{path}: file not found; generate the dataset with `python data/generate.py`")
    elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {suffixes}")
    rows = _json_records(path) if path.is_file() and path.suffix.lower() in (".jsonl", ".json") else _dataset_rows(path)
    records = [{**normalize_record(raw, f"{path}:{number}"), "_line": number} for number, raw in rows]
    if not records:
        raise DataError(f"{path}: no records; the file is empty")
    return records


def hold_out_validation(
    records: Sequence[dict], fraction: float, seed: int, source: str, recorded: dict | None = None
) -> tuple[list[dict], list[dict], dict]:
    """Split one file into (train, validation, split record for config.json), disjoint, in file order; a run's
    `recorded` split (`dataset.validation_split`) is reused, so a resume or evaluate.py sees the same one.
    DataError if too few records are left to train on, or the file no longer matches `recorded`."""
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
    """Hex sha256 of a data file, or of a save_to_disk folder (each file's relative name and bytes)."""
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


def read_run_record(config_file: Path, *keys: str) -> object:
    """The value at `keys` in a run's config.json / training_args.json, or None (no file, bad JSON, no key)."""
    try:
        value = json.loads(Path(config_file).read_text()) if Path(config_file).is_file() else None
    except json.JSONDecodeError:
        return None
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:  # the template's raise_exception(), e.g. "roles must alternate"
        raise DataError(
            f"the chat template of {tokenizer.name_or_path} refuses this conversation ({err}); fix the record, "
            "or pass --chat-template FILE"
        ) from None


def _reply_end(rendered: str, start: int, reply: str, specials: list[str], model: str) -> tuple[int, str]:
    """Where the special token closing the reply after `start` ends, and that token."""
    reply = reply.strip()  # templates often `| trim` the content
    found = rendered.find(reply, start)
    if found < 0:
        raise DataError(
            f"the chat template of {model} rewrites the assistant reply text, so its tokens cannot be located; "
            f"{TEMPLATE_HINT} not"
        )
    after = rendered[found + len(reply) :]
    position = len(rendered) - len(after.lstrip())  # whitespace skipped, e.g. Llama 2's "reply </s>"
    marker = next((text for text in specials if rendered.startswith(text, position)), None)
    if marker is None:
        raise DataError(
            f"the chat template of {model} ends an assistant turn with {after[:20]!r}, not with a special "
            f"end-of-turn token, so a model trained on it would never learn to stop; {TEMPLATE_HINT}"
        )
    return position + len(marker), marker


def assistant_turns(
    tokenizer, messages: list[dict], model_name: str | None = None
) -> tuple[str, list[tuple[int, int, str]]]:
    """Render a conversation: (text, [(start, end, end-of-turn token)] per assistant turn, in characters). Turn i
    runs from the end of the turns before it rendered with the generation prompt (what the model sees at inference)
    through the first special token after its text (<|im_end|>, <|eot_id|>, ...). DataError naming the model if
    the template is not prefix-stable, rewrites replies, or ends a turn with no special token."""
    model = model_name or tokenizer.name_or_path or "this model"
    text = _render(tokenizer, messages)
    # every special or added token's text, longest first (so "<|eot_id|>" is never cut short)
    specials = set(tokenizer.all_special_tokens) | {token.content for token in tokenizer.added_tokens_decoder.values()}
    specials = sorted((special for special in specials if special), key=len, reverse=True)
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


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at: the end-of-turn token `assistant_turns` trains, then eos if it differs."""
    _text, turns = assistant_turns(tokenizer, PROBE_CONVERSATION[1:3])
    ids = [tokenizer.convert_tokens_to_ids(turns[-1][2])]
    return ids if tokenizer.eos_token_id in (None, *ids) else [*ids, tokenizer.eos_token_id]


def tokenize_messages(tokenizer, messages: list[dict]) -> dict:
    """Tokenize one conversation: {"input_ids", "labels"}, labels -100 outside the assistant replies.
    The template writes any BOS itself, so no special tokens are added; of two BOS in a row, one goes."""
    text, turns = assistant_turns(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    bos = tokenizer.bos_token_id
    while bos is not None and len(input_ids) > 1 and input_ids[0] == input_ids[1] == bos:
        input_ids, offsets = input_ids[1:], offsets[1:]
    in_reply = [any(first <= start < end for first, end, _ in turns) for start, _ in offsets]
    return {"input_ids": input_ids, "labels": [t if kept else IGNORE_INDEX for t, kept in zip(input_ids, in_reply)]}


def tokenize_records(
    records: Sequence[dict], tokenizer, max_seq_len: int, overlong: str = "truncate_history"
) -> tuple[list[dict], TokenizeStats]:
    """Tokenize records from `load_records`; examples: input_ids, labels, n_trained, index (in records). Longer
    than `max_seq_len`: with "truncate_history" the oldest exchanges after the system prompt go until it fits (the
    final reply is never cut, an example still too long is dropped); with "drop" it is dropped. `text` records
    train every token, and an eos is appended."""
    if overlong not in ("truncate_history", "drop"):
        raise DataError(f"overlong policy must be 'truncate_history' or 'drop', got {overlong!r}")
    stats = TokenizeStats()
    examples = []
    for index, record in enumerate(records):
        where, truncated = f"record at line {record.get('_line', index + 1)}", False
        if "messages" in record:
            messages = record["messages"]
            try:
                example = tokenize_messages(tokenizer, messages)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            while len(example["input_ids"]) > max_seq_len and overlong == "truncate_history":
                head = 1 if messages[0]["role"] == "system" else 0
                # drop the oldest exchange: up to and including the first assistant turn after head
                first_assistant = next(i for i in range(head, len(messages)) if messages[i]["role"] == "assistant")
                if first_assistant == len(messages) - 1:
                    break  # only the final exchange is left; never cut the final reply
                messages = messages[:head] + messages[first_assistant + 1 :]
                example, truncated = tokenize_messages(tokenizer, messages), True
        else:
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            example = {"input_ids": ids, "labels": list(ids)}
        if len(example["input_ids"]) > max_seq_len:
            stats.dropped_overlong += 1
            stats.dropped_ids.append(record.get("id", record.get("_line", index)))
            continue
        n_trained = sum(label != IGNORE_INDEX for label in example["labels"])
        if n_trained == 0:
            raise DataError(f"{where}: no trained token after tokenization")
        stats.truncated_history += int(truncated)
        stats.kept += 1
        stats.trained_tokens += n_trained
        stats.total_tokens += len(example["input_ids"])
        examples.append({**example, "n_trained": n_trained, "index": index})
    return examples, stats


def collate_batch(examples: Sequence[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad examples into {"input_ids", "attention_mask", "labels"} tensors; labels are padded with -100,
    so a pad id equal to the end-of-turn id never hides a trained token."""
    multiple = pad_to_multiple_of or 1
    length = math.ceil(max(len(e["input_ids"]) for e in examples) / multiple) * multiple
    pads = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    rows = [e | {"attention_mask": [1] * len(e["input_ids"])} for e in examples]
    return {
        key: torch.tensor([list(r[key]) + [pad] * (length - len(r[key])) for r in rows], dtype=torch.long)
        for key, pad in pads.items()
    }


class LengthGroupedBatchSampler(BatchSampler):
    """Shuffled batches of similar length (little padding), the same for a seed and epoch (resume): shuffle
    the indices, sort each mega-batch of `batch_size * mega_batch_factor` by length, cut it into batches,
    shuffle the batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega_batch_factor: int = 16):
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
        """This epoch's batches (lists of example indices)."""
        rng = random.Random(self.seed * 100_003 + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.mega_batch_factor  # a whole number of batches
        for at in range(0, len(order), mega):  # each mega-batch sorted, longest first
            order[at : at + mega] = sorted(order[at : at + mega], key=lambda i: self.lengths[i], reverse=True)
        batches = [order[j : j + self.batch_size] for j in range(0, len(order), self.batch_size)]
        # A short batch (the dataset size is not a multiple of batch_size) stays last, so every rank
        # of a multi-process run sees full batches until the very end.
        full = batches[: len(order) // self.batch_size]
        rng.shuffle(full)
        return full + batches[len(full) :]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)
