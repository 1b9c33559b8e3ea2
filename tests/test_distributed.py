"""Two-process data parallel on this CPU (torchrun + gloo) against a single-process run.

`accelerate launch --cpu --num_processes 2` starts only one process here, so the test launches
`torchrun --nproc_per_node 2 train.py ...`; Accelerate then runs as MULTI_CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import train
from tests.conftest import REPO, make_conversation, write_jsonl


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_args(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--train-file", str(data_dir / "train.jsonl"),
        "--validation-file", str(data_dir / "validation.jsonl"), "--output-dir", str(output_dir),
        "--batch-size", "2", "--effective-batch-size", "4", "--epochs", "2", "--rank", "4", "--dropout", "0",
        "--mixed-precision", "no", "--report-to", "none", "--num-samples", "1", "--max-new-tokens", "4",
        "--eval-batch-size", "2", "--log-examples", "--save-every", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """16 training examples of varied length, 7 validation examples (odd: ranks get unequal shards)."""
    path = tmp_path_factory.mktemp("ddp-data")
    records = [make_conversation(i) for i in range(16)]
    for i, record in enumerate(records):
        record["messages"][-1]["content"] += " Details follow." * (i % 5)
    write_jsonl(path / "train.jsonl", records)
    write_jsonl(path / "validation.jsonl", [make_conversation(100 + i) for i in range(7)])
    return path


def free_port() -> int:
    """A port no one listens on now (a fixed port may still be held by a stale rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: torchrun starts each rank in a session of its own,
    so killing torchrun's process group would leave the ranks holding our pipes open forever."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def start_torchrun(args: list[str], cwd: Path, stdout, stderr) -> subprocess.Popen:
    """Start `torchrun --nproc_per_node 2 train.py ARGS` in a session of its own (so `kill_tree` reaches every rank)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(REPO / "train.py"), *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, text=True, env=env,
                            cwd=cwd, start_new_session=True)  # fmt: skip


def run_torchrun(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess | None:
    """Run `torchrun --nproc_per_node 2 train.py ARGS`; None when it hung past `timeout` (then killed)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Files, not pipes: a rank that outlives a kill can never block this process on a full pipe.
        process = start_torchrun(args, cwd, out, err)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait(timeout=30)
            return None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model_dir, data_dir) -> tuple[Path, subprocess.CompletedProcess]:
    # The run takes ~15 s. No retry: ranks that hang (as they did at exit before train.exit_distributed)
    # must fail this test, not pass on a second try.
    output = tmp_path_factory.mktemp("ddp") / "two"
    result = run_torchrun(run_args(tiny_model_dir, data_dir, output), cwd=output.parent, timeout=180)
    assert result is not None, "torchrun did not finish in 180 s (every process was killed); see train.log in " + str(
        output
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, data_dir) -> Path:
    output = tmp_path_factory.mktemp("single") / "one"
    train.main(run_args(tiny_model_dir, data_dir, output))
    return output


def test_ranks_train_on_disjoint_shards_and_stay_in_sync(two_process_run):
    run, result = two_process_run
    config = json.loads((run / "config.json").read_text())
    assert config["derived"]["num_processes"] == 2 and config["derived"]["grad_accum"] == 1
    assert "MULTI_CPU" in config["derived"]["distributed_type"]
    seen = {rank: read_jsonl(run / f"examples_rank{rank}.jsonl") for rank in (0, 1)}
    for epoch in (0, 1):
        shard = {rank: [i for r in seen[rank] if r["epoch"] == epoch for i in r["index"]] for rank in (0, 1)}
        assert not set(shard[0]) & set(shard[1])  # different examples on each rank
        assert sorted(shard[0] + shard[1]) == list(range(16))  # together: the whole epoch, once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ranks_in_sync"] is True and summary["num_processes"] == 2
    assert "adapter weights identical on all 2 ranks: True" in result.stdout
    # only the main process writes logs: one line per step, no duplicates
    steps = [r["step"] for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"]
    assert steps == list(range(1, 9))
    assert result.stdout.count("step 8 | loss") == 1


def test_every_validation_equals_single_process(two_process_run, one_process_run):
    """The baseline and every epoch's validation: same examples and tokens (nothing duplicated by the
    uneven shards), same loss, same best step and samples scored."""
    two = read_jsonl(two_process_run[0] / "eval_log.jsonl")
    one = read_jsonl(one_process_run / "eval_log.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [0, 4, 8] and two[0]["baseline"]
    for a, b in zip(two, one, strict=True):
        assert a["val_examples"] == b["val_examples"] == 7 and a["val_tokens"] == b["val_tokens"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
        assert a["val_ppl"] == pytest.approx(b["val_ppl"], rel=1e-5)
        assert (a["is_best"], a["sample_n"]) == (b["is_best"], b["sample_n"])


def test_two_process_kill_9_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir, data_dir, two_process_run):
    """SIGKILL every process of a 2-process run once checkpoint step 6 (mid-epoch 2) is complete, resume
    with --resume-from latest: steps 7-8 and the final adapter are those of the uninterrupted run."""
    run = tmp_path / "killed"
    process = start_torchrun(run_args(tiny_model_dir, data_dir, run), tmp_path, subprocess.DEVNULL, subprocess.DEVNULL)
    marker, deadline = run / "checkpoints" / "step_000006" / "COMPLETE", time.monotonic() + 180
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(process.pid)
    process.wait(timeout=30)
    assert marker.exists() and not (run / "final").exists(), "the run ended before it could be killed at step 6"
    logged = [r["step"] for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"]
    assert 6 <= max(logged) < 8
    result = run_torchrun(run_args(tiny_model_dir, data_dir, run, "--resume-from", "latest"), tmp_path, timeout=180)
    assert result is not None and result.returncode == 0, result and result.stderr[-3000:]
    assert "resumed from" in result.stdout and "step 6, epoch 2, batch 2" in result.stdout
    resumed = {r["step"]: r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"}  # last one wins
    uninterrupted = {r["step"]: r for r in read_jsonl(two_process_run[0] / "train_log.jsonl") if r["type"] == "step"}
    assert sorted(resumed) == list(range(1, 9))
    for step in range(7, 9):
        assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-6), step
    final = load_file(run / "final" / "adapter_model.safetensors")
    for name, tensor in load_file(two_process_run[0] / "final" / "adapter_model.safetensors").items():
        torch.testing.assert_close(final[name], tensor, atol=1e-6, rtol=1e-5)
    assert json.loads((run / "summary.json").read_text())["ranks_in_sync"] is True


def test_loss_curve_matches_single_process_with_same_effective_batch(two_process_run, one_process_run):
    """1 process x batch 2 x accum 2 sees the same micro-batches per update as 2 processes x batch 2."""
    two = [r for r in read_jsonl(two_process_run[0] / "train_log.jsonl") if r["type"] == "step"]
    one = [r for r in read_jsonl(one_process_run / "train_log.jsonl") if r["type"] == "step"]
    assert [r["trained_tokens"] for r in two] == [r["trained_tokens"] for r in one]
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    final_two = load_file(two_process_run[0] / "final" / "adapter_model.safetensors")
    final_one = load_file(one_process_run / "final" / "adapter_model.safetensors")
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, atol=1e-5, rtol=1e-4)


def test_two_process_checkpoint_has_every_rank_rng(two_process_run):
    checkpoint = two_process_run[0] / "checkpoints" / "step_000008"
    assert (checkpoint / "COMPLETE").exists()
    states = [json.loads((checkpoint / f"rng_state_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all({"python", "numpy", "torch"} <= set(s) for s in states)
