"""Fast tests of benchmarks/throughput.py's pure functions (no training, no TRL: they run in CI; the
benchmark itself needs TRL, imported only where it runs its arm).

The numbers are worked out by hand in the comments, so a change of the formulas shows up here.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("throughput")


def step(tokens: int, seconds: float, trained: int, loss: float, sum_sq: int = 0) -> dict:
    return {"tokens": tokens, "seconds": seconds, "trained_tokens": trained, "loss": loss, "sum_sq_len": sum_sq}


def test_read_train_log_keeps_step_records_and_recovers_seconds(bench, tmp_path):
    records = [
        {"type": "step", "step": 1, "tokens": 1000, "trained_tokens": 400, "tokens_per_s": 100.0, "loss": 3.0, "mfu": 0.01},
        {"type": "bad_step", "step": 2, "reason": "nan"},
        {"type": "step", "step": 3, "tokens": 900, "trained_tokens": 300, "tokens_per_s": 450.0, "loss": 2.5, "mfu": 0.02},
        {"type": "epoch", "epoch": 1, "step": 3, "mean_train_loss": 2.7, "epoch_time_s": 12.0},
    ]  # fmt: skip
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    steps = bench.read_train_log(log)
    assert [s["step"] for s in steps] == [1, 3]
    assert steps[0]["seconds"] == pytest.approx(10.0)  # 1000 tokens at 100 tokens/s
    assert steps[1]["seconds"] == pytest.approx(2.0)  # 900 / 450
    assert steps[1]["trained_tokens"] == 300 and steps[1]["loss"] == 2.5


def test_summarize_steps_leaves_out_the_warmup_step(bench):
    # warm-up: 1000 tokens in 50 s (would drag the mean down); then 900 + 1100 tokens in 2 + 3 s = 400 tokens/s
    steps = [step(1000, 50.0, 400, 3.0), step(900, 2.0, 350, 2.8), step(1100, 3.0, 450, 2.6)]
    summary = bench.summarize_steps(steps)
    assert summary["tokens_per_s"] == pytest.approx(400.0)
    assert (summary["timed_steps"], summary["timed_tokens"], summary["timed_seconds"]) == (2, 2000, 5.0)
    assert (summary["first_loss"], summary["final_loss"]) == (3.0, 2.6)
    assert summary["trained_tokens_per_step"] == [400, 350, 450]
    with pytest.raises(ValueError, match="warm-up"):
        bench.summarize_steps(steps[:1])


def test_compute_mfu_matches_the_stated_formula(bench):
    params = {"body": 100, "head": 10, "lora": 2, "layers": 2, "hidden": 4}
    # 4*100*10 + 6*2*10 + 4*10*5 + 12*2*4*50/2 = 4000 + 120 + 200 + 2400 = 6720 FLOPs per step, two steps
    steps = [step(10, 0, 5, 0, sum_sq=50), step(10, 0, 5, 0, sum_sq=50)]
    assert bench.compute_mfu(params, steps, seconds=2.0, peak_flops=1000.0) == pytest.approx(2 * 6720 / 2.0 / 1000.0)


def test_plan_steps_follows_train_pys_sampler_and_counts_tokens(bench):
    from common.data import LengthGroupedBatchSampler

    lengths = [10 + 7 * i % 53 for i in range(40)]
    trained = [n // 3 for n in lengths]
    plan = bench.plan_steps(lengths, trained, batch_size=4, grad_accum=2, steps=3, seed=1234)
    batches = LengthGroupedBatchSampler(lengths, 4, seed=1234).batches()
    assert [p["indices"] for p in plan] == [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]
    first = plan[0]["indices"]
    assert plan[0]["tokens"] == sum(lengths[i] for i in first)
    assert plan[0]["trained_tokens"] == sum(trained[i] for i in first)
    assert plan[0]["sum_sq_len"] == sum(lengths[i] ** 2 for i in first)
    with pytest.raises(ValueError, match="need 48 examples"):
        bench.plan_steps(lengths, trained, batch_size=4, grad_accum=4, steps=3, seed=1234)


def test_summarize_arms_and_markdown_table(bench):
    runs = [
        {"repeat": 1, "arm": "ours", "tokens_per_s": 300.0, "timed_seconds": 10.0, "peak_rss_mib": 2000.0,
         "first_loss": 4.0, "final_loss": 3.0, "mfu": 0.10},
        {"repeat": 1, "arm": "trl", "tokens_per_s": 200.0, "timed_seconds": 15.0, "peak_rss_mib": 2500.0,
         "first_loss": 4.0, "final_loss": 3.1, "mfu": 0.05},
        {"repeat": 2, "arm": "ours", "tokens_per_s": 500.0, "timed_seconds": 6.0, "peak_rss_mib": 2100.0,
         "first_loss": 4.0, "final_loss": 3.2, "mfu": 0.14},
    ]  # fmt: skip
    summary = bench.summarize_arms(runs)
    assert summary["ours"]["tokens_per_s"] == pytest.approx(400.0)  # mean of 300 and 500
    assert summary["ours"]["peak_rss_mib"] == 2100.0  # the larger peak
    assert summary["ratio_tokens_per_s"] == pytest.approx(2.0)  # 400 / 200
    assert summary["ratio_peak_rss"] == pytest.approx(2100 / 2500)
    result = {
        "date": "2026-01-01 00:00:00 UTC", "machine": "test box", "load_avg_start": [1.0, 0.5, 0.25],
        "load_avg_end": [2.0, 1.0, 0.5], "peak_flops": 1.9e12, "runs": runs, "summary": summary,
        "config": {"model": "m", "steps": 6, "batch_size": 4, "grad_accum": 4, "precision": "bf16"},
        "plan_trained_tokens": [5, 6], "plan_tokens": [10, 12], "masks_match": True,
        "loss_normalization": "same", "trl_checks": "mixed_precision bf16",
        "matmul_params": {"body": 100, "lora": 2, "head": 10}, "versions": {"trl": "1.16.0"},
        "code_shas": ["aaaaaaaaaaaa", "bbbbbbbbbbbb"],
    }  # fmt: skip
    markdown = bench.render_throughput_report(result)
    assert "| run | arm | tokens/s | timed s | peak RSS MiB | loss step 1 | final loss | MFU |" in markdown
    assert "| 1 | ours | 300 | 10.0 | 2000 | 4.0000 | 3.0000 | 10.0% |" in markdown
    assert "| 1 | trl | 200 | 15.0 | 2500 | 4.0000 | 3.1000 | 5.0% |" in markdown
    assert "tokens/s x2.00" in markdown and "every run matched: yes" in markdown
    assert "aaaaaaaaaaaa, bbbbbbbbbbbb (CHANGED between runs" in markdown  # train.py edited mid-benchmark
    assert "at start 1.00/0.50/0.25, at end 2.00/1.00/0.50" in markdown and "1.90 TFLOP/s" in markdown


def test_run_child_reports_each_childs_own_peak_rss(bench, tmp_path):
    big = tmp_path / "big.py"
    big.write_text("x = bytearray(300 * 2**20)\nx[::4096] = b'1' * len(x[::4096])\n")  # touch every page
    small = tmp_path / "small.py"
    small.write_text("import sys\nsys.exit(3)\n")
    code_big, peak_big = bench.run_child([str(big)], tmp_path / "big.log")
    code_small, peak_small = bench.run_child([str(small)], tmp_path / "small.log")
    assert (code_big, code_small) == (0, 3)  # the exit code comes through, and the peak is written anyway
    # Each child's own peak: neither this (large) pytest process's nor the previous child's.
    assert 300 < peak_big < 400 and peak_small < 100


def test_trl_runs_at_its_faster_precision_and_the_table_says_so(bench):
    assert bench.pick_faster({"no": 210.0, "bf16": 380.0}) == "bf16"  # an AMX CPU
    assert bench.pick_faster({"no": 245.0, "bf16": 160.0}) == "no"  # the 2026-12-01 Xeon without AMX
    spec = {"precision": "no", "base_dtype": "float32", "steps": 6}
    assert bench.trl_spec(spec, "bf16") == {"precision": "bf16", "base_dtype": "bfloat16", "steps": 6}
    assert bench.trl_spec(spec, "no")["base_dtype"] == "float32"
    runs = [
        {"repeat": 1, "arm": "ours", "tokens_per_s": 600.0, "timed_seconds": 5.0, "peak_rss_mib": 2000.0,
         "first_loss": 4.0, "final_loss": 3.0, "mfu": 0.4, "precision": "bf16", "base_dtype": "bfloat16"},
        {"repeat": 1, "arm": "trl", "tokens_per_s": 380.0, "timed_seconds": 8.0, "peak_rss_mib": 2500.0,
         "first_loss": 4.0, "final_loss": 3.0, "mfu": 0.25, "precision": "bf16", "base_dtype": "bfloat16"},
    ]  # fmt: skip
    result = {
        "date": "2026-01-01 00:00:00 UTC", "machine": "test box", "load_avg_start": [0.0] * 3,
        "load_avg_end": [0.0] * 3, "peak_flops": 0.98e12, "probe_flops": {"fp32": 0.25e12, "bf16": 0.98e12},
        "runs": runs, "summary": bench.summarize_arms(runs), "trl_probe": {"runs": {"no": 210.0, "bf16": 380.0}, "kept": "bf16"},
        "config": {"model": "m", "steps": 6, "batch_size": 4, "grad_accum": 4, "precision": "auto",
                   "trl_precision": "best", "trl_precision_kept": "bf16"},
        "plan_trained_tokens": [5], "plan_tokens": [10], "masks_match": True, "loss_normalization": "same",
        "trl_checks": "", "matmul_params": {"body": 100, "lora": 2, "head": 10}, "versions": {}, "code_shas": ["a"],
    }  # fmt: skip
    markdown = bench.render_throughput_report(result)
    assert "ours auto, TRL bf16" in markdown.splitlines()[0]
    assert "at the model's shapes (fp32 0.25, bf16 0.98 TFLOP/s): 0.98 TFLOP/s" in markdown
    assert "TRL precision probe: no 210 tokens/s, bf16 380 tokens/s: bf16 kept." in markdown
    assert "ours bf16 / bfloat16, trl bf16 / bfloat16" in markdown


def test_dropout_and_compile_reach_our_arm_and_the_table_header(bench, tmp_path, monkeypatch):
    commands = []

    def fake_child(command: list[str], log: object) -> tuple[int, float]:
        commands.append(command)
        raise RuntimeError("stop before training")

    monkeypatch.setattr(bench, "run_child", fake_child)
    for argv in (["--dropout", "0", "--compile"], []):
        with pytest.raises(RuntimeError, match="stop before training"):
            bench.run_ours(bench.parse_args(argv), tmp_path / "run", tmp_path / "validation.jsonl")
    compiled, plain = commands
    assert compiled[compiled.index("--dropout") + 1] == "0.0" and "--compile" in compiled
    assert plain[plain.index("--dropout") + 1] == "0.05" and "--compile" not in plain
    runs = [
        {"repeat": 1, "arm": "ours", "tokens_per_s": 600.0, "timed_seconds": 5.0, "peak_rss_mib": 2000.0,
         "first_loss": 4.0, "final_loss": 3.0, "mfu": 0.4},
    ]  # fmt: skip
    result = {
        "date": "2026-01-01 00:00:00 UTC", "machine": "test box", "load_avg_start": [0.0] * 3,
        "load_avg_end": [0.0] * 3, "peak_flops": 1e12, "runs": runs, "summary": bench.summarize_arms(runs),
        "config": {"model": "m", "steps": 6, "batch_size": 4, "grad_accum": 4, "precision": "auto",
                   "dropout": 0.0, "compile": True, "trl_compile": True},
        "plan_trained_tokens": [5], "plan_tokens": [10], "masks_match": True, "loss_normalization": "same",
        "trl_checks": "", "matmul_params": {"body": 100, "lora": 2, "head": 10}, "versions": {}, "code_shas": ["a"],
    }  # fmt: skip
    header = bench.render_throughput_report(result).splitlines()[0]
    assert header.endswith("LoRA dropout 0.0, ours compiled, TRL compiled"), header


def test_describe_machine_names_the_cpu_and_its_matmul_units(bench):
    description = bench.describe_machine()
    assert "cores" in description and "GiB" in description
    assert any(unit in description for unit in ("AMX-BF16", "AVX512-BF16", "no bf16 unit"))
    assert any(unit in description for unit in ("AMX-FP16", "AVX512-FP16", "no fp16 unit"))
