"""sweep.py: grid expansion, resuming without rerunning finished configurations, summary table.

Most tests run sweep.py against a tiny fake training script (written into tmp_path) that records
its command line and writes the run-folder files train.py would; one test runs the real train.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import sweep

REPO = Path(__file__).resolve().parents[1]

FAKE_TRAIN = """
import json, math, os, sys
from pathlib import Path

argv = sys.argv[1:]
def flag(name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default

out = Path(flag("--output-dir"))
with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if (out / "config.json").exists() and "--overwrite" not in argv and "--resume-from" not in argv:
    sys.exit("error: folder already holds a run")  # what the real train.py does
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"args": argv}))
if os.environ.get("FAKE_TRAIN_FAIL") and os.environ["FAKE_TRAIN_FAIL"] in flag("--run-name"):
    sys.exit("error: simulated crash")
lr, rank = float(flag("--lr", "2e-4")), int(flag("--rank", "8"))
best = 1.0 + 1000 * abs(lr - 2e-4) + 0.001 * rank
ci = os.environ.get("FAKE_CI", "0.001")
evals = [{"step": 0, "epoch": 0.0, "val_loss": 2.0, "val_ppl": math.exp(2.0), "baseline": True}]
for epoch, loss in ((1, best + 0.05), (2, best), (3, best + 0.01)):
    record = {"step": 10 * epoch, "epoch": float(epoch), "val_loss": loss, "val_ppl": math.exp(loss), "baseline": False}
    if ci != "none":
        record["val_loss_ci95"] = float(ci)
    evals.append(record)
(out / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\\n" for e in evals))
(out / "train_log.jsonl").write_text(json.dumps({"type": "step", "step": 30, "loss": best - 0.1}) + "\\n")
summary = {"status": "completed", "best_epoch": 2, "best_val_ppl": math.exp(best), "train_time_s": 12.5,
           "peak_mem_mb": 321.0, "tokens_per_s": 987.0}
(out / "summary.json").write_text(json.dumps(summary))
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """Write the fake script; return (script path, function giving the recorded command lines)."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))

    def recorded() -> list[list[str]]:
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []

    return script, recorded


def run_sweep(tmp_path, script, *extra):
    argv = ["--grid", "lr=1e-4,2e-4", "rank=4,8", "--name", "demo", "--sweeps-dir", str(tmp_path / "sweeps")]
    return sweep.main([*argv, "--train-script", str(script), "--subset", "10", *extra, "--", "--max-steps", "2"])


def test_grid_runs_every_configuration_and_writes_summary(tmp_path, fake_train):
    script, recorded = fake_train
    rows = run_sweep(tmp_path, script)
    calls = recorded()
    assert len(calls) == 4
    first = calls[0]
    assert first[first.index("--run-name") + 1] == "lr=1e-4_rank=4"
    assert first[first.index("--output-dir") + 1] == str(tmp_path / "sweeps" / "demo" / "lr=1e-4_rank=4")
    assert first[-2:] == ["--max-steps", "2"] and first[first.index("--subset") + 1] == "10"
    assert {(c[c.index("--lr") + 1], c[c.index("--rank") + 1]) for c in calls} == {
        ("1e-4", "4"),
        ("1e-4", "8"),
        ("2e-4", "4"),
        ("2e-4", "8"),
    }
    best = [r for r in rows if r["is_best"]]
    assert [r["config"] for r in best] == ["lr=2e-4_rank=4"]
    assert best[0]["best_val_loss"] == pytest.approx(1.004) and best[0]["final_val_loss"] == pytest.approx(1.014)
    sweep_dir = tmp_path / "sweeps" / "demo"
    with open(sweep_dir / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and [r["is_best"] for r in table].count("True") == 1
    assert float(table[0]["train_time_s"]) == 12.5 and float(table[0]["peak_mem_mb"]) == 321.0
    summary = (sweep_dir / "summary.md").read_text()
    assert "| lr=2e-4_rank=4 | completed | 1.014 | 2.729 | 2 | 12.5 | 321 | 987 | **best** |" in summary
    assert "beats every other one by more than the validation noise" in summary


def test_sweep_resumes_without_rerunning_finished_configurations(tmp_path, fake_train, monkeypatch):
    script, recorded = fake_train
    monkeypatch.setenv("FAKE_TRAIN_FAIL", "lr=1e-4_rank=8")
    with pytest.raises(SystemExit, match=r"1 configuration\(s\) failed: lr=1e-4_rank=8"):
        run_sweep(tmp_path, script)
    assert len(recorded()) == 4  # the failure did not stop the other configurations
    summary = (tmp_path / "sweeps" / "demo" / "summary.md").read_text()
    assert "| lr=1e-4_rank=8 | not finished |" in summary

    monkeypatch.delenv("FAKE_TRAIN_FAIL")
    run_sweep(tmp_path, script)
    calls = recorded()
    assert len(calls) == 5  # only the failed configuration ran again ...
    assert calls[-1][calls[-1].index("--run-name") + 1] == "lr=1e-4_rank=8"
    assert "--overwrite" in calls[-1]  # ... replacing its half-written folder (no checkpoint to resume)

    # an interrupted run with a complete checkpoint resumes instead of starting over
    run_dir = tmp_path / "sweeps" / "demo" / "lr=2e-4_rank=8"
    (run_dir / "summary.json").unlink()
    (run_dir / "checkpoints" / "step_000010").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_000010" / "COMPLETE").write_text("")
    run_sweep(tmp_path, script)
    assert len(recorded()) == 6 and recorded()[-1][-4:] == ["--resume-from", "latest", "--max-steps", "2"]
    run_sweep(tmp_path, script)
    assert len(recorded()) == 6  # everything finished: nothing reruns


def test_noise_note(tmp_path, fake_train, monkeypatch):
    script, _ = fake_train
    monkeypatch.setenv("FAKE_CI", "0.5")
    run_sweep(tmp_path, script)
    assert "Diminishing returns" in (tmp_path / "sweeps" / "demo" / "summary.md").read_text()
    monkeypatch.setenv("FAKE_CI", "none")
    sweep.main(
        [
            "--grid",
            "lr=1e-4,3e-4",
            "--name",
            "other",
            "--sweeps-dir",
            str(tmp_path / "sweeps"),
            "--train-script",
            str(script),
        ]
    )
    assert "validation noise unknown" in (tmp_path / "sweeps" / "other" / "summary.md").read_text()


def test_bad_arguments_are_refused(tmp_path, fake_train, capsys):
    script, recorded = fake_train
    for argv in (
        ["--grid", "lr"],
        ["--grid", "lr=1e-4,"],
        ["--grid", "output_dir=x"],
        ["--grid", "lr=1", "lr=2"],
        ["--grid", "lr=1e-4", "--", "--lr", "3e-4"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            sweep.main([*argv, "--sweeps-dir", str(tmp_path), "--train-script", str(script)])
        assert exit_info.value.code == 2
    assert recorded() == []
    run_sweep(tmp_path, script)
    with pytest.raises(SystemExit, match="was run with"):  # same name, different fixed arguments
        sweep.main(
            [
                "--grid",
                "lr=1e-4",
                "--name",
                "demo",
                "--sweeps-dir",
                str(tmp_path / "sweeps"),
                "--train-script",
                str(script),
                "--",
                "--max-steps",
                "5",
            ]
        )


def test_dry_run_and_summary_only(tmp_path, fake_train):
    script, recorded = fake_train
    sweep.main(["--grid", "lr=1e-4,2e-4", "--sweeps-dir", str(tmp_path / "sweeps"), "--dry-run"])
    assert recorded() == [] and not (tmp_path / "sweeps").exists()  # a dry run writes nothing
    run_sweep(tmp_path, script)
    (tmp_path / "sweeps" / "demo" / "summary.md").unlink()
    argv = ["--grid", "lr=1e-4,2e-4", "rank=4,8", "--name", "demo", "--sweeps-dir", str(tmp_path / "sweeps")]
    rows = sweep.main(
        [*argv, "--train-script", str(script), "--subset", "10", "--summary-only", "--", "--max-steps", "2"]
    )
    assert len(recorded()) == 4 and len(rows) == 4 and (tmp_path / "sweeps" / "demo" / "summary.md").exists()


@pytest.mark.skipif(not (REPO / "train.py").exists(), reason="train.py not written yet")
def test_sweep_with_real_train_script(tmp_path, tiny_model_dir, toy_data_dir):
    fixed = [
        "--model",
        str(tiny_model_dir),
        "--train-file",
        str(toy_data_dir / "train.jsonl"),
        "--validation-file",
        str(toy_data_dir / "validation.jsonl"),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--effective-batch-size",
        "4",
        "--max-seq-len",
        "256",
        "--no-baseline",
        "--num-samples",
        "0",
        "--report-to",
        "none",
        "--mixed-precision",
        "no",
    ]
    rows = sweep.main(
        ["--grid", "lr=1e-3", "--subset", "8", "--name", "real", "--sweeps-dir", str(tmp_path / "sweeps"), "--", *fixed]
    )
    run_dir = tmp_path / "sweeps" / "real" / "lr=1e-3"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] in sweep.FINISHED and summary["global_step"] == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["args"]["lr"] == 1e-3 and config["args"]["subset"] == 8
    assert rows[0]["is_best"] and rows[0]["best_val_loss"] is not None and rows[0]["val_loss_ci95"] is not None
    assert (tmp_path / "sweeps" / "real" / "logs" / "lr=1e-3.log").stat().st_size > 0
    # the table's number is the run's own: the lowest validation loss in its eval_log.jsonl
    evals = [json.loads(line) for line in (run_dir / "eval_log.jsonl").read_text().splitlines()]
    assert rows[0]["best_val_loss"] == pytest.approx(min(e["val_loss"] for e in evals))
    again = sweep.main(
        ["--grid", "lr=1e-3", "--subset", "8", "--name", "real", "--sweeps-dir", str(tmp_path / "sweeps"), "--", *fixed]
    )
    assert json.loads((run_dir / "summary.json").read_text()) == summary  # not retrained
    assert again[0]["best_val_loss"] == rows[0]["best_val_loss"]
