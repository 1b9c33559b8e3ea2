"""common/run_folder.py's run lock and common/jsonio.py's strict JSON.

    python -m pytest -q tests/test_run_folder.py

The lock test starts real processes that race for one folder's lock at the same instant: exactly
one may win, every round, and a holder killed with SIGKILL must not leave a lock that blocks the
next run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.jsonio import dumps, loads, read_jsonl, to_strict
from common.run_folder import RunFolderError, acquire_lock, release_lock
from export import is_locked
from tests.conftest import REPO

# A racer imports the lock code, says it is ready, spins until the "go" file appears, then tries to
# take the lock and holds it while the others try.
RACER = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from common.run_folder import RunFolderError, acquire_lock, release_lock

folder, go = Path(sys.argv[2]), Path(sys.argv[3])
Path(sys.argv[4]).write_text("ready")
while not go.exists():
    pass
try:
    lock = acquire_lock(folder)
except RunFolderError as err:
    print("refused:", err, flush=True)
    sys.exit(0)
print("won", flush=True)
time.sleep(float(sys.argv[5]))
release_lock(lock)
"""


def start_racers(folder: Path, count: int, hold_s: float) -> list[subprocess.Popen]:
    """Start `count` racer processes for `folder`'s lock; return them once all wait at the start line."""
    script = folder.parent / "racer.py"
    script.write_text(RACER)
    go = folder / "go"
    ready = [folder.parent / f"{folder.name}.ready{i}" for i in range(count)]
    racers = [
        subprocess.Popen(
            [sys.executable, str(script), str(REPO), str(folder), str(go), str(r), str(hold_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in ready
    ]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.05)
    go.write_text("go")
    return racers


def test_processes_racing_for_the_lock_exactly_one_wins(tmp_path, record_property):
    """Three processes released at the same instant, two rounds: each round exactly one holds the lock"""
    outcomes = []
    for round_ in range(2):
        folder = tmp_path / f"run{round_}"
        folder.mkdir()
        outputs = [p.communicate(timeout=120)[0] for p in start_racers(folder, count=3, hold_s=3.0)]
        winners = [o for o in outputs if o.startswith("won")]
        assert len(winners) == 1, outputs
        assert all("is in use by process" in o for o in outputs if not o.startswith("won")), outputs
        assert not (folder / ".lock").exists()  # released by the winner
        outcomes.append(f"{len(winners)} won / {len(outputs) - len(winners)} refused")
    record_property("observed", "; ".join(outcomes))


def test_lock_names_its_holder_and_a_killed_holder_does_not_block(tmp_path):
    """A live holder is named in the refusal; after kill -9 the stale lock file does not block the next run"""
    folder = tmp_path / "run"
    folder.mkdir()
    (holder,) = start_racers(folder, count=1, hold_s=600)
    deadline = time.monotonic() + 60
    while not (folder / ".lock").exists() or not (folder / ".lock").read_text():
        assert time.monotonic() < deadline, "the holder did not take the lock"
        time.sleep(0.05)
    with pytest.raises(RunFolderError, match=f"is in use by process {holder.pid}"):
        acquire_lock(folder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert (folder / ".lock").exists()  # the file stays behind, its flock died with the process
    lock = acquire_lock(folder)
    assert (folder / ".lock").read_text().split()[0] == str(os.getpid())
    release_lock(lock)
    assert not (folder / ".lock").exists()


def test_is_locked_asks_the_kernel_not_the_file(tmp_path):
    """No file or a stale file: not locked; a live holder in another process or in this one: locked"""
    folder = tmp_path / "run"
    folder.mkdir()
    assert not is_locked(folder)
    assert not (folder / ".lock").exists()  # asking creates nothing
    (folder / ".lock").write_text("12345 somehost 2026-01-01T00:00:00\n")  # left by a killed run
    assert not is_locked(folder)
    assert (folder / ".lock").read_text().startswith("12345")  # the stale file is left as it was
    (holder,) = start_racers(folder, count=1, hold_s=600)
    try:
        assert holder.stdout.readline().startswith("won")
        assert is_locked(folder)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    assert not is_locked(folder)  # the holder died: its flock went with it, the file stays
    lock = acquire_lock(folder)
    assert is_locked(folder)
    release_lock(lock)
    assert not is_locked(folder)


def test_strict_json_writes_null_and_a_flag_and_reads_back(tmp_path):
    """NaN/Infinity become null + a "nonfinite" flag (valid for any JSON parser); jsonio restores them"""
    record = {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-4, "curve": [1.0, -math.inf], "nested": {"x": math.nan}}
    text = dumps(record)

    def reject(name: str) -> None:
        raise AssertionError(f"bare {name}")

    strict = json.loads(text, parse_constant=reject)
    assert (
        strict["loss"] is None
        and strict["curve"] == [1.0, None]
        and strict["nested"] == {"x": None, "nonfinite": {"x": "NaN"}}
    )
    assert strict["nonfinite"] == {"loss": "NaN", "grad_norm": "Infinity", "curve[1]": "-Infinity"}
    back = loads(text)
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf and back["curve"] == [1.0, -math.inf]
    assert math.isnan(back["nested"]["x"]) and "nonfinite" not in back and back["lr"] == 1e-4
    assert to_strict({"a": 1.0}) == {"a": 1.0}  # finite data is unchanged
    assert math.isnan(loads('{"loss": NaN}')["loss"])  # a file written before strict JSON still reads
    old = tmp_path / "old.jsonl"  # a log written before strict JSON still reads
    old.write_text('{"loss": NaN}\n{"loss": 1.0}\n{"loss": ')
    losses = [r["loss"] for r in read_jsonl(old, skip_torn_last_line=True)]
    assert math.isnan(losses[0]) and losses[1] == 1.0
