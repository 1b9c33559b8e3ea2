"""Convergence report from synthetic run logs: plots exist and verdicts match the constructed curves."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import evaluate
from common.jsonio import read_jsonl
from common.report import (
    THRESHOLDS,
    analyze_run,
    check_gradients,
    check_task_learned,
    detect_convergence,
    detect_overfitting,
    find_dead_adapters,
    load_run_logs,
    smooth,
)

STEPS_PER_EPOCH = 25


def write_run(run_dir, losses, val_losses, grad_norms=None, dead_key=None, baseline_loss=3.0):
    """Write a run folder as train.py would (docs/run_folder.md), from given curves.

    Args:
        losses: train loss per optimizer step (step = index + 1).
        val_losses: validation loss at the end of each epoch.
        grad_norms: global grad norm per step (default: a slowly decaying 1.0).
        dead_key: "layer.module" whose LoRA gradients are ~0.
    """
    run_dir.mkdir(parents=True)
    grad_norms = grad_norms if grad_norms is not None else [1.0 * 0.99**i for i in range(len(losses))]
    lines = []
    for i, (loss, norm) in enumerate(zip(losses, grad_norms)):
        step = i + 1
        lines.append(
            {
                "type": "step",
                "step": step,
                "epoch": step / STEPS_PER_EPOCH,
                "loss": loss,
                "lr": 2e-4 * min(1.0, step / 10),
                "grad_norm": norm,
                "tokens": 1000,
                "trained_tokens": 300,
                "tokens_per_s": 900.0,
                "skipped": False,
            }
        )
        if step % STEPS_PER_EPOCH == 0:
            epoch_losses = losses[step - STEPS_PER_EPOCH : step]
            lines.append(
                {
                    "type": "epoch",
                    "epoch": step // STEPS_PER_EPOCH,
                    "step": step,
                    "mean_train_loss": float(np.mean(epoch_losses)),
                    "epoch_time_s": 10.0,
                }
            )
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    evals = [
        {
            "step": 0,
            "epoch": 0.0,
            "val_loss": baseline_loss,
            "val_ppl": math.exp(baseline_loss),
            "val_tokens": 500,
            "baseline": True,
            "is_best": False,
        }
    ]
    for epoch, val in enumerate(val_losses, start=1):
        evals.append(
            {
                "step": epoch * STEPS_PER_EPOCH,
                "epoch": float(epoch),
                "val_loss": val,
                "val_ppl": math.exp(val) if val < 700 else math.inf,
                "val_tokens": 500,
                "baseline": False,
                "is_best": False,
                "val_loss_ci95": 0.02,
            }
        )
    (run_dir / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    grads = []
    for step in range(1, len(losses) + 1, 5):
        norms = {}
        for layer in range(2):
            for module in ("q_proj", "k_proj", "v_proj"):
                scale = 1e-9 if f"{layer}.{module}" == dead_key else 0.01 * (1 + layer)
                norms[f"{layer}.{module}.A"] = 0.0 if step == 1 else scale
                norms[f"{layer}.{module}.B"] = scale * 2
        grads.append({"step": step, "norms": norms})
    (run_dir / "grad_log.jsonl").write_text("".join(json.dumps(g) + "\n" for g in grads))
    ratios = {
        f"{layer}.{module}": 0.001 * (layer + 1) for layer in range(2) for module in ("q_proj", "k_proj", "v_proj")
    }
    (run_dir / "update_ratios.json").write_text(json.dumps(ratios))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "global_step": len(losses)}))
    return run_dir


def decaying(n=100, noise=0.02, seed=0):
    """A smoothly decaying loss curve with multiplicative noise."""
    rng = np.random.default_rng(seed)
    steps = np.arange(n)
    return list((2.5 * np.exp(-steps / 60) + 0.5) * (1 + noise * rng.standard_normal(n)))


def test_healthy_run_report_files_and_verdicts(tmp_path):
    run_dir = write_run(tmp_path / "run", decaying(), [1.8, 1.4, 1.2, 1.1], dead_key="1.k_proj")
    analysis = evaluate.main(["--report", str(run_dir)])
    report_dir = run_dir / "report"
    for name in ("loss", "val_ppl", "lr", "grad_norm", "lora_grad_heatmap", "update_ratio"):
        assert (report_dir / f"{name}.png").stat().st_size > 1000, name
    assert analysis["convergence"]["verdict"] == "smooth decline"
    assert analysis["overfitting"]["overfitting"] is False
    assert analysis["overfitting"]["best_epoch"] == 4.0
    assert analysis["gradients"]["verdict"] == "ok"
    # only the constructed dead layer is dead; lora_A's zero gradient at step 1 is not
    assert analysis["dead_adapters"]["dead"] == ["1.k_proj.A", "1.k_proj.B"]
    assert analysis["dead_adapters"]["a_zero_at_init"] is True
    assert analysis["baseline"]["ppl_reduction"] == pytest.approx(1 - math.exp(1.1) / math.exp(3.0))
    assert any("more epochs" in tip for tip in analysis["recommendations"])
    report = (report_dir / "report.md").read_text()
    assert "| convergence | **smooth decline** |" in report
    assert "exactly 0 at logged step(s) 1 because lora_B is initialized to zero" in report
    assert "dead adapter matrices: 1.k_proj.A, 1.k_proj.B" in report
    assert "![loss](loss.png)" in report and "| divergence_rise | 0.1 |" in report
    assert json.loads((report_dir / "analysis.json").read_text())["convergence"]["verdict"] == "smooth decline"


def test_diverging_curve_is_called_divergence(tmp_path):
    losses = decaying(40) + [1.5 * 1.15**i for i in range(60)]  # learns, then blows up
    run_dir = write_run(
        tmp_path / "run", losses, [1.8, 1.5, 3.0, 40.0], grad_norms=[1.0] * 40 + [1.3**i for i in range(60)]
    )
    analysis = analyze_run(load_run_logs(run_dir))
    assert analysis["convergence"]["verdict"] == "divergence"
    assert analysis["gradients"]["verdict"] == "exploding"
    assert any("diverged" in failure for failure in analysis["failure_modes"])
    assert any("lower the learning rate" in tip for tip in analysis["recommendations"])
    # non-finite losses are divergence too, whatever the rest looks like
    assert detect_convergence([2.0] * 20 + [float("nan")])["verdict"] == "divergence"


def test_overfitting_curve_is_called_overfitting(tmp_path):
    val = [1.6, 1.2, 1.25, 1.35, 1.5]  # minimum at epoch 2, then rising for 3 evaluations
    run_dir = write_run(tmp_path / "run", decaying(125), val)
    evaluate.main(["--report", str(run_dir), "--output-dir", str(tmp_path / "out")])
    analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())
    over = analysis["overfitting"]
    assert over["overfitting"] is True
    assert over["best_epoch"] == 2.0 and over["best_step"] == 50 and over["rising_after_best"] == 3
    assert over["gap_at_end"] > over["gap_at_best"]  # the train/validation gap widens
    assert any("overfitting" in failure for failure in analysis["failure_modes"])
    assert any("stop at the best evaluation (step 50, epoch 2)" in tip for tip in analysis["recommendations"])
    assert "| overfitting | **overfitting** |" in (tmp_path / "out" / "report.md").read_text()


def test_plateau_and_oscillation_curves():
    rng = np.random.default_rng(0)
    flat = list(2.0 * (1 + 0.02 * rng.standard_normal(100)))
    plateau = detect_convergence(flat)
    assert plateau["verdict"] == "plateau" and abs(plateau["last_third_decline"]) < THRESHOLDS["plateau_decline"]
    steps = np.arange(100)
    bouncing = list(1.5 + 0.6 * np.sin(0.9 * steps))
    oscillation = detect_convergence(bouncing)
    assert oscillation["verdict"] == "oscillation"
    assert oscillation["rel_std"] > THRESHOLDS["oscillation_rel_std"]
    assert abs(oscillation["residual_autocorr"]) > THRESHOLDS["oscillation_autocorr"]
    alternating = detect_convergence(list(1.5 + 0.5 * (-1.0) ** steps))  # up, down, up, ...
    assert alternating["verdict"] == "oscillation" and alternating["residual_autocorr"] < -0.9
    # ordinary minibatch noise on a declining curve is not oscillation
    assert detect_convergence(decaying(noise=0.05))["verdict"] == "smooth decline"
    # batch 2: each step's loss scatters ~30% independently around the trend (the demo: 24%)
    scattered = list(np.exp(-steps / 30) * (1 + 0.3 * rng.standard_normal(100)) + 0.01)
    noisy = detect_convergence(scattered)
    assert noisy["rel_std"] > THRESHOLDS["oscillation_rel_std"]
    assert noisy["sign_change_rate"] > THRESHOLDS["oscillation_sign_changes"]
    assert abs(noisy["residual_autocorr"]) < THRESHOLDS["oscillation_autocorr"]
    assert noisy["verdict"] == "smooth decline" and "minibatch noise, not oscillation" in noisy["reason"]
    assert detect_convergence([1.0] * 5)["verdict"] == "insufficient data"


def test_overfitting_needs_falling_train_loss():
    steps = [{"step": s, "loss": 1.0} for s in range(1, 101)]  # train loss flat, not falling
    evals = [{"step": s, "epoch": s / 25, "val_loss": v} for s, v in zip((25, 50, 75, 100), (1.5, 1.2, 1.3, 1.4))]
    result = detect_overfitting(steps, evals)
    assert result["overfitting"] is False and result["rising_after_best"] == 2 and result["train_falling"] is False


def test_gradient_checks():
    vanishing = check_gradients([{"step": i, "grad_norm": 1.0 * 0.9**i} for i in range(100)], [])
    assert vanishing["verdict"] == "vanishing" and vanishing["late_median"] < 0.01 * vanishing["early_median"]
    bad = check_gradients([{"step": 1, "grad_norm": 1.0}, {"step": 2, "grad_norm": float("inf")}], [{"step": 2}])
    assert bad["verdict"] == "exploding" and bad["non_finite"] == 1 and bad["bad_steps"] == 1
    assert check_gradients([{"step": 1}], [])["verdict"] == "no data"


def test_dead_adapters_while_lora_b_is_still_zero():
    # lr is 0 at the first warmup step, so A's gradient is still 0 at step 2; a later 0 is dead
    zero_a = {"0.q_proj.A": 0.0, "1.q_proj.A": 0.0, "0.q_proj.B": 0.1, "1.q_proj.B": 0.2}
    later = {"0.q_proj.A": 0.05, "1.q_proj.A": 0.0, "0.q_proj.B": 0.1, "1.q_proj.B": 0.2}
    result = find_dead_adapters(
        [{"step": 1, "norms": zero_a}, {"step": 2, "norms": zero_a}, {"step": 3, "norms": later}]
    )
    assert result["a_zero_steps"] == [1, 2] and result["dead"] == ["1.q_proj.A"]
    only_init = find_dead_adapters([{"step": 1, "norms": zero_a}])
    assert only_init["a_zero_at_init"] is True and only_init["dead"] == []
    assert find_dead_adapters([])["dead"] == []


def test_log_reading_tolerates_torn_line_and_missing_run(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path, skip_torn_last_line=True) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []
    assert smooth([1.0, float("nan"), 1.0], span=3) == [1.0, 1.0, 1.0]
    with pytest.raises(SystemExit, match="does not exist"):
        evaluate.main(["--report", str(tmp_path / "no-such-run")])


def test_skipped_bad_steps_are_reported_not_plotted_as_divergence(tmp_path):
    run_dir = write_run(tmp_path / "run", decaying(), [1.8, 1.4, 1.2, 1.1])
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    step_50 = next(i for i, line in enumerate(lines) if json.loads(line).get("step") == 50)
    record = json.loads(lines[step_50])
    record.update(loss=float("nan"), grad_norm=float("inf"), skipped=True)  # train.py skipped this update
    lines[step_50] = json.dumps(record)
    lines.append(json.dumps({"type": "bad_step", "step": 50, "reason": "loss nan, grad norm inf"}))
    (run_dir / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": "stopped_bad_steps", "stop_reason": "4 in a row"}))
    analysis = analyze_run(load_run_logs(run_dir))
    assert analysis["convergence"]["verdict"] == "smooth decline"  # judged on the updates that happened
    assert analysis["gradients"]["verdict"] == "exploding" and analysis["gradients"]["bad_steps"] == 1
    assert "run status stopped_bad_steps: 4 in a row" in analysis["failure_modes"]


def test_loss_falling_without_decisions_is_flagged():
    baseline = {"step": 0, "val_loss": 3.7, "baseline": True}
    evals = [
        {"step": 19, "val_loss": 3.0, "sample_n": 5, "sample_parse_rate": 0.0, "sample_outcome_accuracy": 0.0},
        {"step": 38, "val_loss": 2.7, "sample_n": 5, "sample_parse_rate": 0.0, "sample_outcome_accuracy": 0.0},
    ]
    task = check_task_learned(evals, baseline)
    assert task["verdict"] == "loss falling but no decision learned"
    assert task["reason"] == (
        "last validation (step 38): 0% of 5 sample replies parse, 0% have the right outcome; "
        "validation loss fell 3.700 -> 2.700"
    )
    evals[-1] |= {"sample_parse_rate": 1.0, "sample_outcome_accuracy": 0.8}
    assert check_task_learned(evals, baseline) == {
        "verdict": "decisions learned",
        "reason": "last validation (step 38): 100% of 5 sample replies parse, 80% have the right outcome",
        "last_parse_rate": 1.0,
        "last_outcome_accuracy": 0.8,
    }
    evals[-1] |= {"sample_outcome_accuracy": 0.4}
    assert check_task_learned(evals, baseline)["verdict"] == "partly learned"
    assert check_task_learned([{"step": 5, "val_loss": 1.0}], None)["verdict"] == "not scored"


def test_report_names_the_task_failure(tmp_path):
    run_dir = write_run(tmp_path / "run", decaying(), [1.8, 1.4, 1.2, 1.1])
    lines = (run_dir / "eval_log.jsonl").read_text().splitlines()
    zero = {"sample_n": 3, "sample_parse_rate": 0.0, "sample_outcome_accuracy": 0.0}
    scored = [json.dumps(json.loads(line) | zero) for line in lines]
    (run_dir / "eval_log.jsonl").write_text("\n".join(scored) + "\n")
    analysis = evaluate.main(["--report", str(run_dir)])
    assert analysis["task"]["verdict"] == "loss falling but no decision learned"
    assert any(f.startswith("loss falling but no decision learned") for f in analysis["failure_modes"])
    report = (run_dir / "report" / "report.md").read_text()
    assert "| task (sample decisions) | **loss falling but no decision learned** |" in report


def test_another_tasks_sample_scores_are_judged_on_every_key(tmp_path):
    """A task with its own score_reply keys (train.py logs sample_exact, sample_close): same checks, its words"""
    baseline = {"step": 0, "val_loss": 3.7, "baseline": True}
    evals = [
        {"step": 19, "val_loss": 3.0, "sample_n": 4, "sample_exact": 0.25, "sample_close": 0.5},
        {"step": 38, "val_loss": 2.7, "sample_n": 4, "sample_exact": 0.0, "sample_close": 0.0},
        {"step": 57, "val_loss": 2.6, "sample_n": 0},  # no reply scored: the one before is the last scored
    ]
    task = check_task_learned(evals, baseline)
    assert task == {
        "verdict": "loss falling but task not learned",
        "reason": "last validation (step 38): mean scores of 4 sample replies: exact 0%, close 0%; "
        "validation loss fell 3.700 -> 2.700",
        "last_scores": {"exact": 0.0, "close": 0.0},
    }
    evals[1] |= {"sample_exact": 0.75, "sample_close": THRESHOLDS["task_score"]}
    assert check_task_learned(evals, baseline)["verdict"] == "task learned"
    evals[1] |= {"sample_close": THRESHOLDS["task_score"] - 0.01}  # one key below: partly
    assert check_task_learned(evals, baseline)["verdict"] == "partly learned"
    assert check_task_learned(evals[2:], baseline)["verdict"] == "not scored"

    run_dir = write_run(tmp_path / "run", decaying(), [1.8, 1.4, 1.2, 1.1])
    lines = (run_dir / "eval_log.jsonl").read_text().splitlines()
    scored = [json.dumps(json.loads(line) | {"sample_n": 3, "sample_exact": 0.0}) for line in lines]
    (run_dir / "eval_log.jsonl").write_text("\n".join(scored) + "\n")
    analysis = evaluate.main(["--report", str(run_dir)])
    assert any(f.startswith("loss falling but task not learned: ") for f in analysis["failure_modes"])
    report = (run_dir / "report" / "report.md").read_text()
    assert "| task (sample scores) | **loss falling but task not learned** | " in report
    assert "decision" not in analysis["task"]["reason"] + " ".join(analysis["failure_modes"])
    (run_dir / "eval_log.jsonl").write_text("\n".join(line.replace(": 0.0}", ": 0.5}") for line in scored) + "\n")
    analysis = evaluate.main(["--report", str(run_dir)])
    assert any(t.startswith("task scores only partly learned (") for t in analysis["recommendations"])
