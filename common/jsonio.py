"""Strict JSON for every file the scripts write: config.json, the JSONL logs, metrics, markers.

`json.dumps` writes a NaN loss as a bare `NaN`, which strict parsers (jq, JavaScript) reject. Here a
non-finite float is written as `null` and named in a "nonfinite" field of the object holding it,
`{"loss": null, "nonfinite": {"loss": "NaN"}}`, and the readers here put the values back.
"""

import json
import math
import os
from pathlib import Path

NONFINITE_KEY = "nonfinite"
_VALUES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_NAMES = {str(value): name for name, value in _VALUES.items()}  # str(math.nan) == "nan", ...


def to_strict(value: object) -> object:
    """A copy of `value` with non-finite floats as None, flagged in the dict holding them:
    {"nonfinite": {key: "NaN" | "Infinity" | "-Infinity"}} (a list element as "key[i]")."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [to_strict(v) for v in value]
    if not isinstance(value, dict):
        return value
    result, flags = {}, {}
    for key, item in value.items():
        named = {f"{key}[{i}]": v for i, v in enumerate(item)} if isinstance(item, list | tuple) else {str(key): item}
        flags |= {name: _NAMES[str(v)] for name, v in named.items() if isinstance(v, float) and not math.isfinite(v)}
        result[key] = to_strict(item)
    if flags:
        result[NONFINITE_KEY] = flags
    return result


def _restore(obj: dict) -> dict:
    """`json.loads` object_hook (called innermost first): put the flagged non-finite values back."""
    for flagged, name in (obj.pop(NONFINITE_KEY, None) or {}).items():
        key, _, index = flagged.partition("[")
        if index and isinstance(obj.get(key), list):
            obj[key][int(index.rstrip("]"))] = _VALUES[name]
        elif key in obj:
            obj[key] = _VALUES[name]
    return obj


def dumps(data: object, indent: int | None = None, sort_keys: bool = True) -> str:
    """Serialize as strict JSON: non-finite floats as null + flag, other non-JSON objects as str."""
    return json.dumps(to_strict(data), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)


def loads(text: str) -> object:
    """Parse JSON written by `dumps`, flagged values restored (the bare NaN of older files is accepted too)."""
    return json.loads(text, object_hook=_restore)


def write_json(path: Path, data: object) -> None:
    """Write strict JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, missing_ok: bool = False) -> object:
    """Read a JSON file (an older file's bare NaN accepted); None if it is missing and `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    return loads(path.read_text())


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as a strict JSON line (flushed, so a kill loses at most the line being written)."""
    with open(path, "a") as handle:
        handle.write(dumps(record) + "\n")
        handle.flush()


def write_jsonl(path: Path, records: list, sort_keys: bool = True) -> None:
    """Write records as strict JSON lines, replacing the file."""
    Path(path).write_text("".join(dumps(r, sort_keys=sort_keys) + "\n" for r in records))


def read_jsonl(path: Path, skip_torn_last_line: bool = False) -> list:
    """Read a JSON-lines file (missing: []); `skip_torn_last_line` drops an unparsable last line (a run
    killed while writing it), any other bad line raises ValueError."""
    path = Path(path)
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(loads(line))
        except ValueError:
            if not (skip_torn_last_line and number == len(lines)):
                raise
    return records
