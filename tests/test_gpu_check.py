"""benchmarks/gpu_check.py: one line and exit 0 without CUDA; its whole pipeline on a CPU smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, load_benchmark


@pytest.fixture(scope="module")
def gpu_check():
    return load_benchmark("gpu_check")


def test_without_cuda_it_prints_one_line_and_exits_0(tmp_path):
    output = tmp_path / "gpu.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU even on a machine that has one
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "gpu_check.py: no CUDA device here, nothing to check; run it on a machine with a GPU"
    ]
    assert not output.exists()  # nothing measured, nothing written


def test_main_without_cuda_returns_0(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output", str(tmp_path / "gpu.md")]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "gpu.md").exists()


def test_error_band_is_the_largest_deviation(gpu_check):
    rows = {"a": {"reserved_ratio": 0.93, "allocated_ratio": 1.04}, "b": {"reserved_ratio": 1.08}, "c": {"error": "x"}}
    assert gpu_check.error_band(rows) == pytest.approx(0.08)
    assert gpu_check.error_band({"c": {"error": "x"}}) is None


def test_cpu_smoke_run_of_the_whole_pipeline(gpu_check, tiny_model_dir, toy_data_dir, tmp_path, capsys):
    """train.py subprocess, memory measurement and gpu.md on the tiny model (CPU: fp16 through our GradScaler)."""
    output = tmp_path / "gpu.md"
    argv = ["--allow-cpu", "--model", str(tiny_model_dir), "--train-file", str(toy_data_dir / "train.jsonl")]
    argv += ["--validation-file", str(toy_data_dir / "validation.jsonl")]
    argv += ["--runs", "lora-fp16,lora-bf16", "--steps", "2", "--batch-size", "2", "--grad-accum", "2"]
    argv += ["--max-seq-len", "256", "--memory-batch-size", "2", "--memory-seq-len", "64", "--output", str(output)]
    assert gpu_check.main(argv) == 0, capsys.readouterr().out
    markdown = output.read_text()
    assert markdown.startswith("# GPU check (benchmarks/gpu_check.py)")
    row = next(line for line in markdown.splitlines() if line.startswith("| lora-fp16 | fp16 | float16 |"))
    assert row.endswith("| 65536 |")  # the GradScaler ran (and never backed off on this tiny model)
    assert "Skipped: lora-bf16 (no bf16 below compute capability 8.0)" in markdown  # a CPU has none: like a T4
    memory_row = next(line for line in markdown.splitlines() if line.startswith("| lora-fp16 | off |"))
    assert memory_row.endswith("- | - |")  # no max_memory_allocated off CUDA
    result = json.loads(output.with_suffix(".json").read_text())
    assert result["train"]["lora-fp16"]["tokens_per_s"] > 0 and result["train"]["lora-fp16"]["mfu"] > 0
    assert result["memory"]["lora-fp16"]["reserved_gib"] > 0 and result["error_band"] is not None
