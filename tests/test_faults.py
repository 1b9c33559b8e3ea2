"""Fault tests: kill -9 at chosen points, crashes during checkpoint writes, corrupted checkpoints,
NaN/inf injection, two runs in one folder, and an unwritable or full output disk.

    python -m pytest -q tests/test_faults.py

The kill tests run real `python train.py` processes and end them with SIGKILL. One *victim* run
folder is killed four times in a row and resumed with `--resume-from latest` after each kill; an
uninterrupted *reference* run with the same flags runs alongside it. Every step record of every
segment, the evaluations, best/ and final/ must equal the reference's exactly (tiny model, fp32, CPU,
one thread in every process so the float reductions happen in the same order).

A kill must land at a known place, so the victim runs train.py through a small wrapper (FAULT_WRAPPER,
written to a temp folder) that pauses at one point (after a step's log line, inside an accumulation
window, just before the epoch-end checkpoint, or halfway through writing a checkpoint), writes a
signal file and sleeps; the test then sends SIGKILL. The wrapper only adds the pause: the training
code is train.py's own.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
from common import checkpoint, run_folder
from common.checkpoint import CheckpointError, list_complete, verify
from common.jsonio import read_jsonl
from tests.conftest import REPO
from tests.faults import inject_faults

# 24 examples, batch 2 x accum 2 -> 6 optimizer steps per epoch, 12 in all; a checkpoint every 2
# steps and at each epoch end (step 6 is saved twice: before and after the epoch-end evaluation).
RUN_FLAGS = [
    "--batch-size", "2", "--grad-accum", "2", "--epochs", "2", "--save-every", "2", "--rank", "4",
    "--alpha", "8", "--seed", "7", "--max-seq-len", "256", "--mixed-precision", "no", "--report-to", "none",
    "--num-samples", "0", "--no-baseline", "--early-stopping-patience", "0",
]  # fmt: skip
STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens", "trained_tokens", "epoch", "skipped")
WAIT_S = 240  # generous: the CPU is shared with other test sessions

FAULT_WRAPPER = '''
"""Run train.main() with one pause point (FAULT_PAUSE=kind:N); on reaching it, write FAULT_SIGNAL and sleep."""
import inspect
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.environ["FAULT_REPO"])
import common.checkpoint as checkpoint
import common.jsonio as jsonio
from common.loss import TrainedTokenLoss
import train

KIND, _, N = os.environ["FAULT_PAUSE"].partition(":")
N = int(N)
logged_steps, forwards = [], [0]


def pause(**where):
    Path(os.environ["FAULT_SIGNAL"]).write_text(json.dumps(where))
    time.sleep(600)  # the test sends SIGKILL now


original_append = jsonio.append_jsonl
def append_jsonl(path, record):
    original_append(path, record)
    if record.get("type") == "step":
        logged_steps.append(record["step"])
        forwards[0] = 0
        if KIND == "after_step" and record["step"] == N:
            pause(after_step=N)


original_forward = TrainedTokenLoss.forward
def forward(self, *args, **kwargs):
    # in_window:N -> pause in the 2nd micro-batch of step N's window: the 1st one's gradients are accumulated
    if KIND == "in_window" and logged_steps and logged_steps[-1] == N - 1:
        forwards[0] += 1
        if forwards[0] == 2:
            pause(in_window=N, micro_batches_done=1)
    return original_forward(self, *args, **kwargs)


original_save_checkpoint = checkpoint.save
def save_checkpoint(*args, **kwargs):
    # before_epoch_save:N -> the epoch-end evaluation (and best/) is done, its checkpoint not started
    state = inspect.signature(original_save_checkpoint).bind(*args, **kwargs).arguments["trainer_state"]
    if KIND == "before_epoch_save" and state["global_step"] == N and state["batches_done_in_epoch"] == 0:
        pause(before_epoch_save=N)
    return original_save_checkpoint(*args, **kwargs)


original_save_file = checkpoint.save_file
def save_file(*args, **kwargs):
    # mid_save:N -> the adapter of step N's checkpoint is written, the optimizer state is not
    path = Path(inspect.signature(original_save_file).bind(*args, **kwargs).arguments["filename"])
    if KIND == "mid_save" and path.parent.name == f".step_{N:06d}.tmp":
        pause(mid_save=str(path))
    return original_save_file(*args, **kwargs)


jsonio.append_jsonl = append_jsonl
TrainedTokenLoss.forward = forward
checkpoint.save = save_checkpoint
checkpoint.save_file = save_file
train.main(sys.argv[1:])
'''

# The victim's kill points, in the order they happen. expect_resume: (step, epoch, batch) that the
# NEXT launch must report in its "resumed from" line (epoch is 1-based, batch = batches done in it).
KillPoint = namedtuple("KillPoint", "name pause checkpoint expect_resume")
KILL_POINTS = [
    KillPoint("mid-epoch, after step 3 (epoch 1 of 2)", "after_step:3", "step_000002", (2, 1, 4)),
    KillPoint("inside the accumulation window of step 5", "in_window:5", "step_000004", (4, 1, 8)),
    KillPoint("right after the epoch-end evaluation at step 6", "before_epoch_save:6", "step_000006", (6, 1, 12)),
    KillPoint("while writing checkpoint step_000008", "mid_save:8", "step_000006", (6, 2, 0)),
]
RESUMED = re.compile(r"resumed from (\S+): step (\d+), epoch (\d+), batch (\d+)")


# --- helpers ---


def steps_by_number(records: list[dict]) -> dict[int, dict]:
    """Step records keyed by step; a resumed run logs replayed steps again and the last one wins."""
    return {r["step"]: r for r in records if r.get("type") == "step"}


def assert_steps_equal(records: list[dict], reference: dict[int, dict], what: str) -> int:
    """Every step record in `records` equals the reference run's record of that step; returns how many."""
    steps = [r for r in records if r.get("type") == "step"]
    for record in steps:
        expected = reference[record["step"]]
        got, want = ({k: r[k] for k in STEP_FIELDS} for r in (record, expected))
        assert got == want, f"{what}: step {record['step']} differs from the uninterrupted run"
    return len(steps)


def assert_same_tensors(file: Path, reference_file: Path) -> None:
    got, want = load_file(file), load_file(reference_file)
    assert sorted(got) == sorted(want), file
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), f"{file}: {name} differs from {reference_file}"


def subprocess_env(**extra: str) -> dict:
    """One thread everywhere: identical float reduction order in the reference and the victim."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAULT_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def launch(command: list[str], log: Path, **env: str) -> subprocess.Popen:
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env(**env), cwd=REPO)


def log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


def wait_for_file(path: Path, process: subprocess.Popen, log: Path, timeout: float = WAIT_S) -> str:
    """Wait until `path` exists (the wrapper's pause signal); fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before {path.name}:\n{log_tail(log)}"
        assert time.monotonic() < deadline, f"timeout waiting for {path}:\n{log_tail(log)}"
        time.sleep(0.05)
    time.sleep(0.05)  # the signal file is written in one call; let it land
    return path.read_text()


def kill9(process: subprocess.Popen) -> int:
    os.kill(process.pid, signal.SIGKILL)
    return process.wait(timeout=60)


def finish(process: subprocess.Popen, log: Path) -> None:
    try:
        returncode = process.wait(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    last = next((line for line in reversed(log_tail(log).splitlines()) if line.strip()), "")
    assert returncode == 0, f"rc {returncode}: {last}\n{log_tail(log)}"


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def flags(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--train-file", str(data_dir / "train.jsonl"),
        "--validation-file", str(data_dir / "validation.jsonl"), "--output-dir", str(output_dir), *RUN_FLAGS, *extra,
    ]  # fmt: skip


def in_process_args(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for train.main() in this process (no need for one thread: nothing is compared exactly)."""
    return flags(model_dir, data_dir, output_dir, "--epochs", "1", *extra)


# --- the reference run and the killed-and-resumed victim run ---


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """Start the uninterrupted run; the returned function waits for it and returns its folder."""
    run = tmp_path_factory.mktemp("reference") / "run"
    log = run.parent / "stdout.log"
    process = launch([sys.executable, str(REPO / "train.py"), *flags(tiny_model_dir, toy_data_dir, run)], log)

    def wait() -> Path:
        if process.returncode is None:
            finish(process, log)
        return run

    yield wait
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def victim(tmp_path_factory, tiny_model_dir, toy_data_dir, reference):
    """Kill the victim run at every KILL_POINTS entry in turn, resuming after each; then let it finish.

    While the first launch is paused (alive, holding the lock), a second run into the same folder
    is attempted in this process, with and without --resume-from.

    Returns:
        {"run", "reference", "segments": [{"records", "signal", "returncode", "files", "resumed"}, ...],
         "second_run": {"new", "resume" (the refusal messages), "pid", "unchanged"}}
    """
    root = tmp_path_factory.mktemp("victim")
    run, log = root / "run", root / "stdout.log"
    (root / "fault_wrapper.py").write_text(FAULT_WRAPPER)
    processes, segments, second_run = [], [], {}
    try:
        for index, point in enumerate(KILL_POINTS):
            resume = ["--resume-from", "latest"] if index else []
            signal_file = root / f"signal_{index}.json"
            lines_before = len(read_jsonl(run / "train_log.jsonl"))
            command = [
                sys.executable,
                str(root / "fault_wrapper.py"),
                *flags(tiny_model_dir, toy_data_dir, run),
                *resume,
            ]
            process = launch(command, log, FAULT_REPO=str(REPO), FAULT_PAUSE=point.pause, FAULT_SIGNAL=str(signal_file))
            processes.append(process)
            where = json.loads(wait_for_file(signal_file, process, log))
            if index == 0:  # a second run while the first one is alive
                before = tree(run)
                for key, extra in (("new", []), ("resume", ["--resume-from", "latest"])):
                    try:
                        train.main(in_process_args(tiny_model_dir, toy_data_dir, run, *extra))
                        second_run[key] = "started (not refused)"
                    except SystemExit as exit_:
                        second_run[key] = str(exit_)
                second_run.update(pid=process.pid, unchanged=tree(run) == before)
            files = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
            returncode = kill9(process)
            segments.append({"signal": where, "returncode": returncode, "files": files,
                             "records": read_jsonl(run / "train_log.jsonl")[lines_before:]})  # fmt: skip
        lines_before = len(read_jsonl(run / "train_log.jsonl"))
        process = launch([sys.executable, str(REPO / "train.py"), *flags(tiny_model_dir, toy_data_dir, run), "--resume-from", "latest"], log)  # fmt: skip
        processes.append(process)
        finish(process, log)
        segments.append({"records": read_jsonl(run / "train_log.jsonl")[lines_before:]})
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    resumed = RESUMED.findall((run / "train.log").read_text())
    for segment, found in zip(segments[1:], resumed, strict=True):
        segment["resumed"] = (Path(found[0]).name, *map(int, found[1:]))
    return {"run": run, "reference": reference(), "segments": segments, "second_run": second_run}


@pytest.mark.parametrize("index", range(len(KILL_POINTS)), ids=[p.name for p in KILL_POINTS])
def test_kill9_then_resume_latest_replays_exactly(victim, index, record_property):
    """kill -9 during training, then --resume-from latest: the resumed steps equal an uninterrupted run's"""
    point = KILL_POINTS[index]
    killed, resumed = victim["segments"][index], victim["segments"][index + 1]
    reference = steps_by_number(read_jsonl(victim["reference"] / "train_log.jsonl"))
    assert killed["returncode"] == -signal.SIGKILL
    assert resumed["resumed"] == (point.checkpoint, *point.expect_resume)
    if point.pause.startswith("in_window"):
        # killed after the window's first micro-batch: the step was never logged and is replayed
        assert killed["signal"] == {"in_window": 5, "micro_batches_done": 1}
        assert max(r["step"] for r in killed["records"] if r["type"] == "step") == 4
    if point.pause.startswith("before_epoch_save"):
        assert "eval_log.jsonl" in killed["files"] and "best/COMPLETE" in killed["files"]
    if point.pause.startswith("mid_save"):
        assert "checkpoints/.step_000008.tmp/adapter_model.safetensors" in killed["files"]
        assert "checkpoints/step_000008" not in killed["files"]
    compared = assert_steps_equal(killed["records"] + resumed["records"], reference, point.name)
    assert compared >= 2
    record_property(
        "observed",
        f"killed (rc {killed['returncode']}) at {killed['signal']}; resumed from {resumed['resumed'][0]} "
        f"(step {resumed['resumed'][1]}, epoch {resumed['resumed'][2]}, batch {resumed['resumed'][3]}); "
        f"{compared} step records equal the uninterrupted run",
    )


def test_killed_four_times_final_adapter_equals_uninterrupted_run(victim, record_property):
    """kill -9 at four points of one run, resumed each time: final/, best/, losses and evaluations equal the uninterrupted run's"""
    run, reference = victim["run"], victim["reference"]
    for folder in ("final", "best"):
        assert_same_tensors(
            run / folder / "adapter_model.safetensors", reference / folder / "adapter_model.safetensors"
        )
    got, want = (steps_by_number(read_jsonl(r / "train_log.jsonl")) for r in (run, reference))
    assert sorted(got) == sorted(want) == list(range(1, 13))
    assert_steps_equal(list(got.values()), want, "last occurrence")
    evals = {r["step"]: r["val_loss"] for r in read_jsonl(run / "eval_log.jsonl")}
    assert evals == {r["step"]: r["val_loss"] for r in read_jsonl(reference / "eval_log.jsonl")}
    summary, expected = (json.loads((r / "summary.json").read_text()) for r in (run, reference))
    for key in ("status", "global_step", "epochs_completed", "best_step", "best_val_ppl", "bad_steps_total"):
        assert summary[key] == expected[key], key
    assert not (run / ".lock").exists()
    assert not list((run / "checkpoints").glob(".*.tmp")), "the interrupted checkpoint's temp folder was left behind"
    record_property(
        "observed", f"final/ and best/ tensors identical; steps 1-12 and evaluations {sorted(evals)} identical"
    )


def test_epoch_mean_train_loss_survives_a_resume(victim, record_property):
    """kill -9 mid-epoch: the epoch's logged mean train loss still covers every step of that epoch"""
    run, reference = victim["run"], victim["reference"]
    got, want = ({r["epoch"]: r["mean_train_loss"] for r in read_jsonl(p / "train_log.jsonl") if r["type"] == "epoch"}
                 for p in (run, reference))  # fmt: skip
    record_property("observed", f"resumed run {got}, uninterrupted {want}")
    assert got == want


def test_second_run_into_a_live_run_folder_is_refused(victim, record_property):
    """Two runs, one output folder: the second refuses to start (live lock), with or without --resume-from"""
    second = victim["second_run"]
    record_property("observed", f"{second['new']} / {second['resume']}")
    assert "already holds a run; pass --resume-from latest to continue it" in second["new"]
    assert f"is in use by process {second['pid']}" in second["resume"]
    assert second["unchanged"], "the refused run changed files of the live run"


# --- crash during save, corrupted checkpoints ---


def test_corrupted_latest_checkpoints_fall_back_to_previous_complete(reference, tiny_model_dir, toy_data_dir, tmp_path, record_property):  # fmt: skip
    """Truncated and corrupted safetensors in the newest checkpoints: named in the log, resume falls back and still matches"""
    original = reference()
    run = tmp_path / "run"
    shutil.copytree(original, run, ignore=shutil.ignore_patterns("final", "summary.json", "update_ratios.json"))
    assert [p.name for p in list_complete(run / "checkpoints")] == ["step_000008", "step_000010", "step_000012"]
    truncated = run / "checkpoints" / "step_000012" / "adapter_model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbled = run / "checkpoints" / "step_000010" / "optimizer.safetensors"
    garbled.write_bytes(b"\xff" * 16 + garbled.read_bytes()[16:])
    lines_before = len(read_jsonl(run / "train_log.jsonl"))
    log = tmp_path / "stdout.log"
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *flags(tiny_model_dir, toy_data_dir, run),
        "--resume-from",
        "latest",
    ]
    finish(launch(command, log), log)
    text = log.read_text()  # the console: the checkpoint may be chosen before train.log is opened
    assert f"skipping checkpoint: {truncated} is corrupted" in text
    assert f"skipping checkpoint: {garbled} is corrupted" in text
    assert RESUMED.findall(text)[-1][1:] == ("8", "2", "4")
    assert_steps_equal(read_jsonl(run / "train_log.jsonl")[lines_before:], steps_by_number(read_jsonl(original / "train_log.jsonl")), "after fallback")  # fmt: skip
    assert_same_tensors(run / "final" / "adapter_model.safetensors", original / "final" / "adapter_model.safetensors")
    observed = " | ".join(re.findall(r"(?:skipping checkpoint:|resumed from) .*", text))
    record_property("observed", observed.replace(str(tmp_path), "<tmp>"))


@pytest.fixture
def checkpoints(reference, tmp_path) -> Path:
    """A copy of the reference run's checkpoints folder (step_000008, _000010, _000012)."""
    folder = tmp_path / "checkpoints"
    shutil.copytree(reference() / "checkpoints", folder)
    return folder


def test_checkpoint_without_complete_marker_is_never_latest(checkpoints, record_property):
    """A checkpoint renamed into place but killed before COMPLETE (and a leftover .tmp) is never picked as latest"""
    renamed = checkpoints / "step_000014"  # crash between the rename and the COMPLETE marker
    shutil.copytree(checkpoints / "step_000012", renamed)
    (renamed / "COMPLETE").unlink()
    shutil.copytree(checkpoints / "step_000012", checkpoints / ".step_000016.tmp")
    logger = run_folder.setup_logging(None, True)
    assert checkpoint.find_resume(checkpoints.parent, "latest", logger) == checkpoints / "step_000012"
    with pytest.raises(CheckpointError, match="has no COMPLETE marker: it was not fully written") as excinfo:
        checkpoint.find_resume(checkpoints.parent, str(renamed), logger)
    record_property("observed", f"latest = step_000012; explicit: {excinfo.value}")


def test_flipped_bytes_in_tensor_data_are_detected(checkpoints, record_property):
    """A checkpoint whose safetensors tensor bytes were silently altered (bit rot) is reported as corrupted"""
    target = checkpoints / "step_000012" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-8:] = b"\x7f" * 8  # the last tensor's data: the header still parses
    target.write_bytes(bytes(data))
    with safe_open(str(target), "pt") as handle:  # the damage is invisible to a plain load
        assert list(handle.keys())
    with pytest.raises(CheckpointError, match=re.escape(str(target))) as excinfo:
        verify(checkpoints / "step_000012")
    record_property("observed", str(excinfo.value))


# --- NaN / inf injection ---


def test_nan_loss_and_inf_gradients_skip_updates_and_are_counted(
    tiny_model_dir, toy_data_dir, tmp_path, record_property, monkeypatch
):
    """NaN loss at step 2 and inf gradients at step 4 under --max-bad-steps 1: both updates skipped, logged and
    counted, the run completes (the in-a-row counter resets after step 3); every saved tensor finite"""
    run = tmp_path / "run"
    inject_faults(monkeypatch, loss={2}, grad={4})
    summary = train.main(in_process_args(tiny_model_dir, toy_data_dir, run, "--max-bad-steps", "1"))
    records = read_jsonl(run / "train_log.jsonl")
    bad = {r["step"]: r["reason"] for r in records if r["type"] == "bad_step"}
    steps = steps_by_number(records)
    assert sorted(bad) == [2, 4] and summary["bad_steps_total"] == 2 and summary["status"] == "completed"
    assert bad[2].startswith("non-finite loss nan") and "grad norm inf" in bad[4]
    assert [steps[s]["skipped"] for s in range(1, 7)] == [False, True, False, True, False, False]
    assert steps[2]["lr"] == steps[1]["lr"] and steps[4]["lr"] == steps[3]["lr"]  # the schedule did not advance
    log = (run / "train.log").read_text()
    assert "step 2 | non-finite loss nan" in log and "(1 in a row)" in log
    # AdamW stepped 4 times in 6 steps: the two poisoned updates never touched the weights
    optimizer = load_file(run / "checkpoints" / "step_000006" / "optimizer.safetensors")
    assert {float(t) for k, t in optimizer.items() if k.endswith(".step")} == {4.0}
    saved = sorted(run.rglob("*.safetensors"))
    assert {"best", "final", "checkpoints"} <= {p.relative_to(run).parts[0] for p in saved}
    for file in saved:
        for name, tensor in load_file(file).items():
            assert torch.isfinite(tensor).all(), f"{file}: {name}"
    # Every JSON file of the run is strict JSON: the NaN loss is null plus a flag, never a bare NaN.
    json_files = [p for p in sorted(run.rglob("*")) if p.suffix in (".json", ".jsonl") or p.name == "COMPLETE"]
    assert {"train_log.jsonl", "summary.json", "trainer_state.json", "optimizer.json"} <= {p.name for p in json_files}
    for file in json_files:
        for line in file.read_text().splitlines() if file.suffix == ".jsonl" else [file.read_text()]:
            json.loads(line, parse_constant=reject_bare_constant)  # raises on NaN / Infinity / -Infinity
    strict = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    poisoned = next(r for r in strict if r["type"] == "step" and r["step"] == 2)
    assert poisoned["loss"] is None and poisoned["nonfinite"] == {"loss": "NaN", "grad_norm": "NaN"}
    assert steps[2]["loss"] != steps[2]["loss"]  # common.jsonio.read_jsonl (read_jsonl here) restores the NaN
    record_property(
        "observed",
        f"bad_step 2: {bad[2]} | bad_step 4: {bad[4]} | {len(saved)} safetensors files all finite | "
        f"{len(json_files)} JSON files strict; step 2: {json.dumps(poisoned['nonfinite'])}",
    )


def reject_bare_constant(name: str) -> None:
    """`parse_constant` of a strict JSON parser: NaN and Infinity are not JSON."""
    raise AssertionError(f"bare {name} in a JSON file")


def test_too_many_bad_steps_in_a_row_stop_the_run(tiny_model_dir, toy_data_dir, tmp_path, record_property, monkeypatch):
    """NaN loss at steps 2, 3, 4 with --max-bad-steps 2: the run stops with a clear message, no final/ is written"""
    run = tmp_path / "run"
    inject_faults(monkeypatch, loss={2, 3, 4})
    with pytest.raises(SystemExit) as excinfo:
        train.main(in_process_args(tiny_model_dir, toy_data_dir, run, "--max-bad-steps", "2"))
    message = str(excinfo.value)
    record_property("observed", message)
    assert message == (
        "error: training stopped: 3 non-finite steps in a row (> --max-bad-steps 2); lower --lr or check the data"
    )
    assert not (run / "final").exists() and not (run / "best").exists() and not (run / ".lock").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped_bad_steps" and summary["bad_steps_total"] == 3 and summary["global_step"] == 4
    for file in run.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(file).values()), file


def test_non_finite_adapter_is_never_saved_as_best_or_final(tiny_model_dir, tmp_path, record_property):
    """An adapter holding NaN is refused by the best/ and final/ writer; the previous best/ stays intact"""
    from peft import get_peft_model_state_dict

    from common.lora import apply_lora
    from common.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    model = apply_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
    best = tmp_path / "best"
    checkpoint.save_adapter_folder(model, tokenizer, best, str(tiny_model_dir), {"metrics.json": {"step": 1}})
    before = tree(best)
    name = next(n for n in get_peft_model_state_dict(model) if "lora_B" in n)
    with torch.no_grad():
        dict(model.named_parameters())[name.replace(".weight", ".default.weight")].fill_(float("nan"))
    with pytest.raises(CheckpointError, match="has non-finite values; refusing to save or export it") as excinfo:
        checkpoint.save_adapter_folder(model, tokenizer, best, str(tiny_model_dir), {"metrics.json": {"step": 2}})
    assert tree(best) == before and not (tmp_path / ".best.tmp").exists()
    record_property("observed", str(excinfo.value).replace(str(tmp_path), "<tmp>"))


def test_non_finite_checkpoint_is_never_exported(tiny_model_dir, toy_data_dir, tmp_path, record_property):
    """export.py refuses an adapter holding inf, and writes nothing"""
    export = pytest.importorskip("export")
    run = tmp_path / "run"
    train.main(in_process_args(tiny_model_dir, toy_data_dir, run, "--save-every", "0"))
    poisoned = run / "best" / "adapter_model.safetensors"
    tensors = load_file(poisoned)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("inf")
    save_file(tensors, str(poisoned))
    (run / "best" / "COMPLETE").write_text("2025-01-01T00:00:00\n")  # a plain marker: no checksum to trip first
    exports = tmp_path / "exports"
    with pytest.raises(SystemExit) as excinfo:
        export.main(["--run", str(run), "--version", "1.0", "--output-dir", str(exports)])
    message = str(excinfo.value)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert "non-finite" in message and first in message
    assert not exports.exists() or not any(exports.iterdir())


# --- unwritable output folder, full disk ---


def assert_nothing_written(output_dir: Path) -> None:
    """A refused run leaves no run files: at most the empty folder the write test created."""
    assert not output_dir.exists() or not any(output_dir.iterdir()), sorted(output_dir.iterdir())


def test_unwritable_output_folder_fails_before_training(tiny_model_dir, toy_data_dir, tmp_path, record_property):
    """--output-dir that cannot be created (under a regular file): clear error before any training"""
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    output_dir = blocker / "run"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as excinfo:
        train.main(in_process_args(tiny_model_dir, toy_data_dir, output_dir))
    message = str(excinfo.value)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert message == f"error: cannot write to {output_dir} (Not a directory); choose a writable --output-dir"
    assert blocker.read_text() == "not a folder" and time.perf_counter() - start < 60


def test_disk_without_room_for_checkpoints_fails_before_training(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, record_property):  # fmt: skip
    """Disk full (10 MiB free): the free-space pre-flight refuses to start; no config.json, no checkpoint"""
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=10 * 2**20))
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as excinfo:
        train.main(in_process_args(tiny_model_dir, toy_data_dir, output_dir))
    message = str(excinfo.value)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert message.startswith(f"error: only 10 MiB free in {output_dir}, the run needs about ")
    assert "lower --save-total-limit, or choose another --output-dir" in message
    assert_nothing_written(output_dir)


def test_disk_full_on_the_write_test_fails_before_training(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, record_property):  # fmt: skip
    """Disk full (ENOSPC when the pre-flight test file is flushed): clear error, nothing left behind"""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as excinfo:
        train.main(in_process_args(tiny_model_dir, toy_data_dir, output_dir))
    message = str(excinfo.value)
    record_property("observed", message.replace(str(tmp_path), "<tmp>"))
    assert message == f"error: cannot write to {output_dir} (No space left on device); choose a writable --output-dir"
    assert_nothing_written(output_dir)
