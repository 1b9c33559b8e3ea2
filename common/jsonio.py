"""Strict JSON for every file the scripts write: config.json, the JSONL logs, metrics, markers.

`json.dumps` writes a NaN loss as a bare `NaN`, which strict parsers (jq, JavaScript) reject. Here a
non-finite float is written as `null` and named in a "nonfinite" field of the object holding it:

    {"loss": null, "grad_norm": null, "nonfinite": {"loss": "NaN", "grad_norm": "NaN"}, ...}

`loads`/`read_json`/`read_jsonl` put the values back, so Python readers see the logged numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

NONFINITE_KEY = "nonfinite"
_NAMES = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_VALUES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _is_nonfinite(value: object) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def to_strict(value: object) -> object:
    """A copy of `value` with non-finite floats as None, flagged in the dict holding them:
    {"nonfinite": {key: "NaN" | "Infinity" | "-Infinity"}} (a list element as "key[i]")."""
    if _is_nonfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [to_strict(v) for v in value]
    if not isinstance(value, dict):
        return value
    result, flags = {}, {}
    for key, item in value.items():
        if _is_nonfinite(item):
            flags[str(key)] = _NAMES[str(item)]
        elif isinstance(item, list | tuple):
            flags |= {f"{key}[{i}]": _NAMES[str(v)] for i, v in enumerate(item) if _is_nonfinite(v)}
        result[key] = to_strict(item)
    if flags:
        result[NONFINITE_KEY] = flags
    return result


def _restore(value: object) -> object:
    if isinstance(value, list):
        return [_restore(v) for v in value]
    if not isinstance(value, dict):
        return value
    result = {k: _restore(v) for k, v in value.items() if k != NONFINITE_KEY}
    for flagged, name in (value.get(NONFINITE_KEY) or {}).items():
        key, _, index = flagged.partition("[")
        if index and isinstance(result.get(key), list):
            result[key][int(index.rstrip("]"))] = _VALUES[name]
        elif key in result:
            result[key] = _VALUES[name]
    return result


def dumps(data: object, indent: int | None = None, sort_keys: bool = True) -> str:
    """Serialize as strict JSON: non-finite floats as null + flag, other non-JSON objects as str."""
    return json.dumps(to_strict(data), indent=indent, sort_keys=sort_keys, default=str, allow_nan=False)


def _reject_constant(name: str) -> float:
    raise ValueError(f"not strict JSON: bare {name}")


def loads(text: str) -> object:
    """Parse strict JSON written by `dumps`, flagged values restored; ValueError on a bare NaN/Infinity."""
    return _restore(json.loads(text, parse_constant=_reject_constant))


def loads_lenient(text: str) -> object:
    """Like `loads`, but also accept the bare NaN/Infinity of files written before strict JSON."""
    return _restore(json.loads(text))


def write_json(path: Path, data: object) -> None:
    """Write strict JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, missing_ok: bool = False) -> object:
    """Read a JSON file (bare NaN of older files accepted), non-finite values restored; None if missing and
    `missing_ok`.

    Raises:
        FileNotFoundError: the file is missing (and not `missing_ok`).
        ValueError: the file is not JSON.
    """
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    return loads_lenient(path.read_text())


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record as a strict JSON line (flushed, so a kill loses at most the line being written)."""
    with open(path, "a") as handle:
        handle.write(dumps(record) + "\n")
        handle.flush()


def write_jsonl(path: Path, records: list, sort_keys: bool = True) -> None:
    """Write records as strict JSON lines, replacing the file."""
    Path(path).write_text("".join(dumps(r, sort_keys=sort_keys) + "\n" for r in records))


def read_jsonl(path: Path, skip_torn_last_line: bool = False) -> list:
    """Read a JSON-lines file (missing: []), non-finite values restored; `skip_torn_last_line` drops an
    unparsable last line (a run killed while writing it).

    Raises:
        ValueError: a line that is not JSON (other than a torn last line when allowed).
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(loads_lenient(line))
        except ValueError:
            if not (skip_torn_last_line and number == len(lines)):
                raise
    return records
