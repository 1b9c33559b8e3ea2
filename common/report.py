"""Convergence report of a training run, computed from its log files only (no retraining).

Reads the run folder described in docs/run_folder.md (train_log.jsonl, eval_log.jsonl,
grad_log.jsonl, update_ratios.json, summary.json, config.json), decides what the curves did with
the thresholds in `THRESHOLDS` (each verdict lists the numbers behind it), draws the plots and
renders `report.md`.

    from common.report import load_run_logs, analyze_run, plot_run, render_report
    logs = load_run_logs("runs/demo")
    analysis = analyze_run(logs)
    plots = plot_run(logs, "runs/demo/report")
    Path("runs/demo/report/report.md").write_text(render_report(analysis, plots))
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from common.jsonio import read_json, read_jsonl

# Every verdict is a comparison against one of these numbers; report.md prints them with THRESHOLD_NOTES.
THRESHOLDS = {
    "window_fraction": 0.2,
    "divergence_rise": 0.10,
    "divergence_rebound": 0.50,
    "oscillation_rel_std": 0.15,
    "oscillation_sign_changes": 0.15,
    "oscillation_autocorr": 0.3,
    "plateau_decline": 0.02,
    "still_improving": 0.05,
    "overfit_evals": 2,
    "overfit_tolerance": 0.005,
    "explode_spike": 10.0,
    "explode_growth": 10.0,
    "vanish_ratio": 0.01,
    "vanish_abs": 1e-6,
    "dead_adapter": 1e-3,
    "task_parse_rate": 0.8,
    "task_outcome_accuracy": 0.6,
    "task_score": 0.6,
    "min_steps": 10,
}
THRESHOLD_NOTES = {
    "window_fraction": "share of the logged steps in the early and in the late window",
    "divergence_rise": "divergence if the late-window mean loss exceeds the early-window mean by this fraction",
    "divergence_rebound": "divergence if the late-window mean exceeds the smoothed minimum by this fraction",
    "oscillation_rel_std": "oscillation needs std(raw - smoothed) / mean(smoothed) over the last half above this",
    "oscillation_sign_changes": "... and the smoothed first difference changing sign on more than this share",
    "oscillation_autocorr": "... and the absolute autocorrelation of that spread at lag 1 or 2 above this (else minibatch noise)",
    "plateau_decline": "plateau if the loss declines less than this fraction across the last third",
    "still_improving": "'train longer' if it still declines more than this fraction across the last third",
    "overfit_evals": "overfitting needs at least this many evaluations above the validation minimum ...",
    "overfit_tolerance": "... each above it by more than this fraction, while the train loss keeps falling",
    "explode_spike": "a gradient spike is a norm above this multiple of the median norm",
    "explode_growth": "exploding if the last-quarter median norm exceeds the first-quarter median by this factor",
    "vanish_ratio": "vanishing if the last-quarter median norm is below this fraction of the first-quarter one",
    "vanish_abs": "... or below this absolute value",
    "dead_adapter": "dead if a LoRA matrix's median grad norm is below this fraction of the median of all",
    "task_parse_rate": "'decisions learned' needs at least this share of the last sample replies to parse ...",
    "task_outcome_accuracy": "... and at least this share to have the right outcome (else 'partly learned')",
    "task_score": "another task: 'task learned' needs every sample score's mean at least this (else 'partly learned')",
    "min_steps": "fewer logged steps than this give no convergence verdict",
}


class ReportError(RuntimeError):
    """The run folder cannot be analysed; the message says what is missing."""


def _read_json(path: Path) -> dict:
    return read_json(path, missing_ok=True) or {}


def _last_per_step(records: list[dict]) -> list[dict]:
    """Keep the last record of each step (a resumed run logs some steps twice), sorted by step."""
    by_step = {record["step"]: record for record in records if "step" in record}
    return [by_step[step] for step in sorted(by_step)]


def load_run_logs(run_dir: str | Path) -> dict:
    """Load every log of a run folder.

    Args:
        run_dir: the folder train.py wrote (runs/<run>).

    Returns:
        {"run_dir", "config", "summary", "steps", "epochs", "bad_steps", "evals", "baseline",
         "grads", "update_ratios"}: step/eval/grad records are de-duplicated per step and sorted.

    Raises:
        ReportError: the folder or its train_log.jsonl step records are missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} does not exist; pass a run folder such as runs/<run>")
    train_log = read_jsonl(run_dir / "train_log.jsonl", skip_torn_last_line=True)
    steps = _last_per_step([r for r in train_log if r.get("type") == "step"])
    if not steps:
        raise ReportError(f"{run_dir / 'train_log.jsonl'} has no step records; has this run trained yet?")
    evals = read_jsonl(run_dir / "eval_log.jsonl", skip_torn_last_line=True)
    baseline = [r for r in evals if r.get("baseline")]
    epochs = {r["epoch"]: r for r in train_log if r.get("type") == "epoch"}
    return {
        "run_dir": str(run_dir),
        "config": _read_json(run_dir / "config.json"),
        "summary": _read_json(run_dir / "summary.json"),
        "steps": steps,
        "epochs": [epochs[e] for e in sorted(epochs)],
        "bad_steps": [r for r in train_log if r.get("type") == "bad_step"],
        "evals": _last_per_step([r for r in evals if not r.get("baseline")]),
        "baseline": baseline[-1] if baseline else None,
        "grads": _last_per_step(read_jsonl(run_dir / "grad_log.jsonl", skip_torn_last_line=True)),
        "update_ratios": _read_json(run_dir / "update_ratios.json"),
    }


def smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing), NaN-tolerant.

    Args:
        values: the raw series.
        span: EMA span; the weight of a new point is 2 / (span + 1).

    Returns:
        The smoothed series (non-finite points are carried over without updating the average).
    """
    alpha = 2.0 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = (1 - alpha) * average + alpha * value
            weight = (1 - alpha) * weight + alpha
        out.append(average / weight if weight else float("nan"))
    return out


def _span(n: int) -> int:
    return max(3, n // 10)


def detect_convergence(losses: list[float]) -> dict:
    """Classify a train-loss curve: divergence, oscillation, plateau or smooth decline.

    Checked in that order (see `THRESHOLDS`): non-finite losses or a late window well above the
    early window or the minimum is divergence; a large spread around the trend whose smoothed
    slope keeps changing sign is oscillation, if the spread is correlated from step to step (a
    bounce or spikes that take steps to recover; the per-step loss of a small batch scatters
    independently around a falling trend, which is noise, not oscillation); a small decline across
    the last third is a plateau.

    Args:
        losses: per-step training losses.

    Returns:
        {"verdict", "reason", and the numbers: "early_mean", "late_mean", "min_smoothed",
         "rel_std", "sign_change_rate", "residual_autocorr", "last_third_decline", "total_decline",
         "non_finite"}.
    """
    t = THRESHOLDS
    n = len(losses)
    non_finite = sum(not math.isfinite(x) for x in losses)
    finite = [x for x in losses if math.isfinite(x)]
    if n < t["min_steps"] or len(finite) < 2:
        return {"verdict": "insufficient data", "reason": f"{n} logged steps (< {t['min_steps']})", "n": n}
    window = max(1, int(n * t["window_fraction"]))
    smoothed = smooth(losses, _span(n))
    early, late = _nanmean(losses[:window]), _nanmean(losses[-window:])
    min_smoothed = float(np.nanmin(smoothed))
    half = np.asarray(losses[n // 2 :], dtype=float)
    trend = np.asarray(smoothed[n // 2 :], dtype=float)
    ok = np.isfinite(half)
    spread = half[ok] - trend[ok]
    rel_std = float(np.std(spread) / max(np.mean(trend[ok]), 1e-12)) if ok.sum() > 1 else 0.0
    residual_autocorr = _largest_autocorrelation(spread, lags=(1, 2))
    slope_signs = np.sign(np.diff(trend))
    slope_signs = slope_signs[slope_signs != 0]
    sign_change_rate = float(np.mean(slope_signs[1:] != slope_signs[:-1])) if slope_signs.size > 1 else 0.0
    third = losses[-max(2, n // 3) :]
    first, second = _nanmean(third[: len(third) // 2]), _nanmean(third[len(third) // 2 :])
    numbers = {
        "n": n,
        "early_mean": early,
        "late_mean": late,
        "min_smoothed": min_smoothed,
        "rel_std": rel_std,
        "sign_change_rate": sign_change_rate,
        "residual_autocorr": residual_autocorr,
        "last_third_decline": (first - second) / max(abs(first), 1e-12),
        "total_decline": (early - late) / max(abs(early), 1e-12),
        "non_finite": non_finite,
    }
    rise = late / max(early, 1e-12) - 1
    rebound = late / max(min_smoothed, 1e-12) - 1
    if non_finite:
        verdict, reason = "divergence", f"{non_finite} non-finite losses"
    elif rise > t["divergence_rise"]:
        verdict, reason = "divergence", f"late-window mean {late:.4g} is {rise:.0%} above the early-window {early:.4g}"
    elif rebound > t["divergence_rebound"]:
        verdict, reason = (
            "divergence",
            f"late-window mean {late:.4g} is {rebound:.0%} above the minimum {min_smoothed:.4g}",
        )
    elif (
        rel_std > t["oscillation_rel_std"]
        and sign_change_rate > t["oscillation_sign_changes"]
        and abs(residual_autocorr) > t["oscillation_autocorr"]
    ):
        verdict = "oscillation"
        reason = (
            f"spread around the trend {rel_std:.0%} of the loss, smoothed slope changes sign {sign_change_rate:.0%}, "
            f"spread autocorrelation {residual_autocorr:+.2f}"
        )
    elif numbers["last_third_decline"] < t["plateau_decline"]:
        verdict, reason = "plateau", f"loss fell only {numbers['last_third_decline']:.1%} across the last third"
    else:
        verdict, reason = (
            "smooth decline",
            f"loss fell {numbers['total_decline']:.0%} from the first to the last window",
        )
    noisy = rel_std > t["oscillation_rel_std"] and abs(residual_autocorr) <= t["oscillation_autocorr"]
    if verdict in ("plateau", "smooth decline") and noisy:
        reason += (
            f" (spread around the trend {rel_std:.0%} of the loss, uncorrelated from step to step"
            f" (autocorrelation {residual_autocorr:+.2f}): minibatch noise, not oscillation)"
        )
    return {"verdict": verdict, "reason": reason, **numbers}


def _largest_autocorrelation(residuals: np.ndarray, lags: tuple[int, ...]) -> float:
    """The autocorrelation of largest magnitude among `lags` (signed); 0.0 for too short a series."""
    centred = residuals - residuals.mean() if residuals.size else residuals
    energy = float(np.sum(centred * centred))
    values = [float(np.sum(centred[lag:] * centred[:-lag]) / energy) for lag in lags if centred.size > lag + 1]
    return max(values, key=abs) if values and energy > 0 else 0.0


def _nanmean(values: list[float]) -> float:
    finite = [x for x in values if math.isfinite(x)]
    return statistics.fmean(finite) if finite else float("nan")


def _train_loss_between(steps: list[dict], start: int, end: int) -> float:
    """Mean train loss of the steps in (start, end]; the value to compare with an eval at `end`."""
    return _nanmean([s["loss"] for s in steps if start < s["step"] <= end])


def detect_overfitting(steps: list[dict], evals: list[dict]) -> dict:
    """Check whether validation loss rose after its minimum while training loss kept falling.

    Args:
        steps: step records (train loss per optimizer step).
        evals: non-baseline evaluation records sorted by step.

    Returns:
        {"overfitting": bool, "reason", "best_step", "best_epoch", "best_val_loss", "evals_after_best",
         "rising_after_best", "train_falling", "gap_at_best", "gap_at_end"} (gaps are val - train loss).
    """
    t = THRESHOLDS
    evals = [e for e in evals if math.isfinite(e.get("val_loss", float("nan")))]
    if not evals:
        return {"overfitting": False, "reason": "no validation evaluations logged"}
    train_at = []
    previous = 0
    for record in evals:
        train_at.append(_train_loss_between(steps, previous, record["step"]))
        previous = record["step"]
    best = min(range(len(evals)), key=lambda i: evals[i]["val_loss"])
    best_loss = evals[best]["val_loss"]
    after = evals[best + 1 :]
    rising = sum(e["val_loss"] > best_loss * (1 + t["overfit_tolerance"]) for e in after)
    train_falling = bool(after) and train_at[-1] < train_at[best]
    overfitting = rising >= t["overfit_evals"] and train_falling
    if overfitting:
        reason = (
            f"validation loss rose above its minimum {best_loss:.4f} (step {evals[best]['step']}) in {rising} later "
            f"evaluations while train loss fell from {train_at[best]:.4f} to {train_at[-1]:.4f}"
        )
    elif after:
        reason = f"{rising} of {len(after)} evaluations after the minimum are above it; train falling: {train_falling}"
    else:
        reason = "validation loss was still at its minimum at the last evaluation"
    return {
        "overfitting": overfitting,
        "reason": reason,
        "best_step": evals[best]["step"],
        "best_epoch": evals[best].get("epoch"),
        "best_val_loss": best_loss,
        "evals_after_best": len(after),
        "rising_after_best": rising,
        "train_falling": train_falling,
        "gap_at_best": best_loss - train_at[best],
        "gap_at_end": evals[-1]["val_loss"] - train_at[-1],
        "val_loss_ci95": evals[best].get("val_loss_ci95"),
    }


def check_gradients(steps: list[dict], bad_steps: list[dict]) -> dict:
    """Vanishing / exploding check of the global gradient norm.

    Args:
        steps: step records with "grad_norm".
        bad_steps: "bad_step" records (non-finite loss or gradients that train.py skipped).

    Returns:
        {"verdict": "ok"|"exploding"|"vanishing"|"no data", "reason", "median", "max", "min",
         "early_median", "late_median", "spikes", "non_finite", "bad_steps"}.
    """
    t = THRESHOLDS
    norms = [s.get("grad_norm") for s in steps if s.get("grad_norm") is not None]
    finite = [x for x in norms if math.isfinite(x)]
    if not finite:
        return {"verdict": "no data", "reason": "no gradient norms logged"}
    quarter = max(1, len(finite) // 4)
    median = statistics.median(finite)
    early, late = statistics.median(finite[:quarter]), statistics.median(finite[-quarter:])
    spikes = sum(x > t["explode_spike"] * median for x in finite)
    numbers = {
        "median": median,
        "max": max(finite),
        "min": min(finite),
        "early_median": early,
        "late_median": late,
        "spikes": spikes,
        "non_finite": len(norms) - len(finite),
        "bad_steps": len(bad_steps),
    }
    if numbers["non_finite"] or bad_steps:
        verdict, reason = "exploding", f"{numbers['non_finite']} non-finite norms, {len(bad_steps)} skipped steps"
    elif late > t["explode_growth"] * early:
        verdict, reason = "exploding", f"late median {late:.3g} is {late / early:.0f}x the early median {early:.3g}"
    elif late < t["vanish_ratio"] * early or late < t["vanish_abs"]:
        verdict, reason = "vanishing", f"late median {late:.3g} vs early median {early:.3g}"
    else:
        verdict = "ok"
        ratio = late / max(early, 1e-30)
        reason = f"median {median:.3g}, late/early {ratio:.2f}, {spikes} spikes > {t['explode_spike']:g}x median"
    return {"verdict": verdict, "reason": reason, **numbers}


def find_dead_adapters(grads: list[dict]) -> dict:
    """Find LoRA matrices whose gradient norm stays ~0 compared with the others.

    lora_B is initialized to zero, so the gradient of every lora_A is exactly 0 (it is multiplied
    by B) until the first update with a non-zero learning rate has moved B; with linear warmup the
    first step's lr is 0, so that can last two steps. The leading records where every lora_A norm is
    exactly 0 are left out for the A matrices and reported as expected, not as dead.

    Args:
        grads: grad_log records {"step", "norms": {"<layer>.<module>.<A|B>": norm}} sorted by step.

    Returns:
        {"dead": [keys], "medians": {key: median norm}, "reference_median", "threshold",
         "a_zero_at_init": bool, "a_zero_steps": [steps left out for lora_A]}.
    """
    a_zero_steps = []
    for record in grads:
        a_norms = [v for k, v in record["norms"].items() if k.endswith(".A")]
        if not a_norms or any(v != 0 for v in a_norms):
            break
        a_zero_steps.append(record["step"])
    series: dict[str, list[float]] = {}
    for record in grads:
        for key, value in record["norms"].items():
            if key.endswith(".A") and record["step"] in a_zero_steps:
                continue
            if value is not None and math.isfinite(value):
                series.setdefault(key, []).append(value)
    medians = {key: statistics.median(values) for key, values in series.items()}
    reference = statistics.median(medians.values()) if medians else None
    threshold = None if reference is None else THRESHOLDS["dead_adapter"] * reference
    dead = [] if threshold is None else sorted((k for k, v in medians.items() if v <= threshold), key=_key_order)
    return {
        "dead": dead,
        "medians": medians,
        "reference_median": reference,
        "threshold": threshold,
        "a_zero_at_init": bool(a_zero_steps),
        "a_zero_steps": a_zero_steps,
    }


def _key_order(key: str) -> tuple:
    parts = key.split(".")
    return (int(parts[0]) if parts[0].isdigit() else 0, *parts[1:])


def compare_with_baseline(baseline: dict | None, evals: list[dict]) -> dict | None:
    """Best validation loss/perplexity against the untouched base model (the step-0 evaluation).

    Returns:
        {"baseline_ppl", "best_ppl", "ppl_reduction" (relative), "loss_delta", "within_noise"}, or None.
    """
    finite = [e for e in evals if math.isfinite(e.get("val_loss", float("nan")))]
    if baseline is None or not finite:
        return None
    best = min(finite, key=lambda e: e["val_loss"])
    delta = baseline["val_loss"] - best["val_loss"]
    ci = best.get("val_loss_ci95")
    return {
        "baseline_ppl": baseline["val_ppl"],
        "best_ppl": best["val_ppl"],
        "ppl_reduction": 1 - best["val_ppl"] / baseline["val_ppl"],
        "loss_delta": delta,
        "val_loss_ci95": ci,
        "within_noise": None if ci is None else abs(delta) <= ci,
    }


def check_task_learned(evals: list[dict], baseline: dict | None) -> dict:
    """Did the run learn the task, not only the language? Judged on the scored sample replies.

    train.py logs `sample_n` and `sample_<key>`, the mean of each key of the task module's
    `score_reply` over the sample replies of every validation. Validation loss can fall for a long
    time while every reply still scores 0: that is the failure flagged here. data/task.py's keys
    (`parse_rate`, `outcome_accuracy`) are judged on those two, any other task on all its keys.

    Args:
        evals: the non-baseline evaluation records, in order.
        baseline: the step-0 evaluation record, or None.

    Returns:
        {"verdict", "reason", and "last_parse_rate", "last_outcome_accuracy" (data/task.py) or
        "last_scores" ({key: mean}, another task)}; verdicts: "decisions learned" | "loss falling but
        no decision learned" (data/task.py), "task learned" | "loss falling but task not learned"
        (another task), "partly learned", "not scored".
    """
    scored = [e for e in evals if e.get("sample_n") and _sample_scores(e)]
    if not scored:
        return {"verdict": "not scored", "reason": "no scored sample replies in eval_log.jsonl (--num-samples 0?)"}
    last = scored[-1]
    scores = _sample_scores(last)
    first_loss = (baseline or scored[0]).get("val_loss", float("nan"))
    loss_fell = math.isfinite(first_loss) and last.get("val_loss", float("nan")) < first_loss
    fell = f"; validation loss fell {first_loss:.3f} -> {last.get('val_loss', float('nan')):.3f}"
    if {"parse_rate", "outcome_accuracy"} <= scores.keys():
        parse, accuracy = scores["parse_rate"], scores["outcome_accuracy"]
        numbers = (
            f"last validation (step {last['step']}): {parse:.0%} of {last['sample_n']} sample replies parse, "
            f"{accuracy:.0%} have the right outcome"
        )
        if parse == 0 and loss_fell:
            verdict, numbers = "loss falling but no decision learned", numbers + fell
        elif parse >= THRESHOLDS["task_parse_rate"] and accuracy >= THRESHOLDS["task_outcome_accuracy"]:
            verdict = "decisions learned"
        else:
            verdict = "partly learned"
        return {"verdict": verdict, "reason": numbers, "last_parse_rate": parse, "last_outcome_accuracy": accuracy}
    listed = ", ".join(f"{key} {value:.0%}" for key, value in scores.items())
    numbers = f"last validation (step {last['step']}): mean scores of {last['sample_n']} sample replies: {listed}"
    if max(scores.values()) == 0 and loss_fell:
        verdict, numbers = "loss falling but task not learned", numbers + fell
    elif min(scores.values()) >= THRESHOLDS["task_score"]:
        verdict = "task learned"
    else:
        verdict = "partly learned"
    return {"verdict": verdict, "reason": numbers, "last_scores": scores}


def _sample_scores(record: dict) -> dict[str, float]:
    """The task scores train.py logged in one evaluation record: {key: mean} of its `sample_<key>` entries."""
    return {k[len("sample_") :]: v for k, v in record.items() if k.startswith("sample_") and k != "sample_n"}


def recommend_next_steps(analysis: dict) -> tuple[list[str], list[str]]:
    """Derive recommendations and failure modes from the computed numbers.

    Args:
        analysis: the dict built by `analyze_run` (without the recommendations yet).

    Returns:
        (recommendations, failure_modes), each a list of sentences quoting the numbers.
    """
    conv, over, grad = analysis["convergence"], analysis["overfitting"], analysis["gradients"]
    dead, base = analysis["dead_adapters"], analysis["baseline"]
    tips, failures = [], []
    if analysis["status"] not in ("completed", "early_stopped", "max_steps"):
        failures.append(f"run status {analysis['status']}: {analysis.get('stop_reason') or 'no stop reason logged'}")
    verdict = conv["verdict"]
    if verdict == "divergence":
        failures.append(f"training diverged: {conv['reason']}")
        tips.append("lower the learning rate 3x (or lengthen warmup) and keep gradient clipping on")
    elif verdict == "oscillation":
        tips.append(f"loss oscillates ({conv['reason']}): lower the learning rate 2x or raise the effective batch")
    elif verdict == "plateau" and conv["total_decline"] < THRESHOLDS["plateau_decline"]:
        failures.append(f"loss barely moved (total decline {conv['total_decline']:.1%}): the adapter is not learning")
        tips.append("raise the learning rate 2-3x and check that assistant tokens are trained (labels not all -100)")
    elif verdict == "plateau":
        tips.append(f"train loss flattened ({conv['reason']}): more epochs at this learning rate will not help")
    elif verdict == "smooth decline" and conv["last_third_decline"] > THRESHOLDS["still_improving"]:
        if not over.get("overfitting") and over.get("evals_after_best", 1) == 0:
            tips.append(
                f"loss still fell {conv['last_third_decline']:.0%} across the last third and validation was still "
                "improving at the end: train for more epochs"
            )
    if over.get("overfitting"):
        failures.append(f"overfitting: {over['reason']}")
        tips.append(
            f"stop at the best evaluation (step {over['best_step']}, epoch {_fmt(over.get('best_epoch'))}): fewer "
            "epochs, or more dropout / a lower rank / more data"
        )
    if grad["verdict"] in ("exploding", "vanishing"):
        failures.append(f"{grad['verdict']} gradients: {grad['reason']}")
        tips.append("lower the learning rate and check clipping" if grad["verdict"] == "exploding" else "raise the lr")
    if dead["dead"]:
        failures.append(f"{len(dead['dead'])} dead adapter matrices: {', '.join(dead['dead'][:8])}")
        tips.append("drop the dead target modules or check that their inputs are not frozen/detached")
    if base is not None and base["loss_delta"] <= 0:
        failures.append(
            f"no improvement over the base model (best ppl {base['best_ppl']:.3f} vs {base['baseline_ppl']:.3f})"
        )
    elif base is not None and base["within_noise"]:
        tips.append(
            "the gain over the base is within the validation noise: evaluate on more examples before trusting it"
        )
    task = analysis.get("task", {})
    if task.get("verdict", "").startswith("loss falling but"):
        failures.append(f"{task['verdict']}: {task['reason']}")
        tips.append(
            "the model learns the language but not the task: raise the learning rate or the number of updates, "
            "target all-linear modules, and check that the final replies are trained (see samples/)"
        )
    elif task.get("verdict") == "partly learned":
        what = "task scores" if "last_scores" in task else "decisions"
        tips.append(f"{what} only partly learned ({task['reason']}): evaluate.py on the validation split tells more")
    if not tips:
        tips.append("no change needed: the run converged cleanly; keep the best checkpoint")
    return tips, failures


def analyze_run(logs: dict) -> dict:
    """Run every check on the loaded logs.

    Args:
        logs: from `load_run_logs`.

    Returns:
        {"run_dir", "status", "stop_reason", "convergence", "overfitting", "gradients", "dead_adapters", "baseline",
         "update_ratios", "recommendations", "failure_modes", "thresholds"}.
    """
    steps = logs["steps"]
    # Steps train.py skipped (non-finite loss/gradient, no update) are counted by the gradient check;
    # the curve is judged on the updates that happened.
    losses = [s.get("loss", float("nan")) for s in steps if not s.get("skipped")]
    analysis = {
        "run_dir": logs["run_dir"],
        "status": logs["summary"].get("status", "unknown (no summary.json)"),
        "stop_reason": logs["summary"].get("stop_reason"),
        "steps_logged": len(steps),
        "convergence": detect_convergence(losses),
        "overfitting": detect_overfitting(steps, logs["evals"]),
        "gradients": check_gradients(steps, logs["bad_steps"]),
        "dead_adapters": find_dead_adapters(logs["grads"]),
        "baseline": compare_with_baseline(logs["baseline"], logs["evals"]),
        "task": check_task_learned(logs["evals"], logs["baseline"]),
        "update_ratios": logs["update_ratios"],
        "thresholds": THRESHOLDS,
    }
    analysis["recommendations"], analysis["failure_modes"] = recommend_next_steps(analysis)
    return analysis


def plot_run(logs: dict, output_dir: str | Path) -> dict[str, Path]:
    """Draw the convergence plots (PNG) that the logs allow.

    Args:
        logs: from `load_run_logs`.
        output_dir: folder for the PNG files (created).

    Returns:
        {plot name: path} for every plot written: loss, val_ppl, lr, grad_norm, lora_grad_heatmap,
        update_ratio.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss": _plot_loss(plt, logs),
        "val_ppl": _plot_val_ppl(plt, logs["evals"], logs["baseline"]) if logs["evals"] else None,
        "lr": _plot_lr(plt, logs["steps"]) if any("lr" in s for s in logs["steps"]) else None,
        "grad_norm": _plot_grad_norm(plt, logs["steps"]),
        "lora_grad_heatmap": _plot_lora_heatmap(plt, matplotlib, logs["grads"]) if logs["grads"] else None,
        "update_ratio": _plot_update_ratio(plt, logs["update_ratios"]) if logs["update_ratios"] else None,
    }
    written = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(output_dir / f"{name}.png", dpi=100)
        plt.close(fig)
        written[name] = output_dir / f"{name}.png"
    return written


def _raw_and_smoothed(ax, x: list[int], values: list[float], label: str, color: str) -> None:
    span = _span(len(values))
    ax.plot(x, values, color=color, alpha=0.3, linewidth=1, label=f"{label} (raw)")
    ax.plot(x, smooth(values, span), color=color, linewidth=2, label=f"{label} (EMA span {span})")


def _plot_loss(plt, logs: dict):
    """Train (raw and smoothed) and validation loss per step, and per epoch."""
    steps, evals = logs["steps"], logs["evals"]
    fig, (ax_step, ax_epoch) = plt.subplots(1, 2, figsize=(12, 4))
    x = [s["step"] for s in steps]
    _raw_and_smoothed(ax_step, x, [s.get("loss", float("nan")) for s in steps], "train loss", "tab:blue")
    if evals:
        ax_step.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange", label="val")
    ax_step.set(xlabel="optimizer step", ylabel="cross-entropy", title="Loss per step")
    ax_step.legend()
    if logs["epochs"]:
        ax_epoch.plot(
            [e["epoch"] for e in logs["epochs"]],
            [e["mean_train_loss"] for e in logs["epochs"]],
            "o-",
            label="train (epoch mean)",
        )
    if evals:
        ax_epoch.plot([e.get("epoch", 0) for e in evals], [e["val_loss"] for e in evals], "o-", label="validation")
    ax_epoch.set(xlabel="epoch", ylabel="cross-entropy", title="Loss per epoch")
    ax_epoch.legend()
    return fig


def _plot_val_ppl(plt, evals: list[dict], base: dict | None):
    """Validation perplexity per evaluation, with the base model's as a line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e["step"] for e in evals], [e["val_ppl"] for e in evals], "o-", label="finetuned")
    if base is not None:
        ax.axhline(base["val_ppl"], color="gray", linestyle="--", label=f"base model {base['val_ppl']:.2f}")
    ax.set(xlabel="optimizer step", ylabel="perplexity", title="Validation perplexity")
    ax.legend()
    return fig


def _plot_lr(plt, steps: list[dict]):
    """The learning-rate schedule."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s["step"] for s in steps], [s.get("lr", float("nan")) for s in steps])
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate schedule")
    return fig


def _plot_grad_norm(plt, steps: list[dict]):
    """The global gradient norm (raw and smoothed, log scale), or None when none was logged."""
    if not any(s.get("grad_norm") is not None for s in steps):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    norms = [s["grad_norm"] if s.get("grad_norm") is not None else float("nan") for s in steps]
    _raw_and_smoothed(ax, [s["step"] for s in steps], norms, "grad norm", "tab:green")
    ax.set(xlabel="optimizer step", ylabel="global L2 norm", title="Gradient norm", yscale="log")
    ax.legend()
    return fig


def _plot_lora_heatmap(plt, matplotlib, grads: list[dict]):
    """log10 gradient norm of every lora_A / lora_B matrix over the logged steps."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, matrix in zip(axes, ("A", "B")):
        keys = sorted({k[:-2] for r in grads for k in r["norms"] if k.endswith(f".{matrix}")}, key=_key_order)
        grid = np.array([[_as_float(r["norms"].get(f"{k}.{matrix}")) for r in grads] for k in keys])
        # exact zeros (lora_A before lora_B has moved) are drawn gray so they do not stretch the color scale
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
        log_grid = np.ma.masked_invalid(np.log10(np.where(grid > 0, grid, np.nan)))
        image = ax.imshow(log_grid, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(keys)), keys, fontsize=7)
        ticks = np.linspace(0, len(grads) - 1, min(len(grads), 6)).astype(int)
        ax.set_xticks(ticks, [grads[i]["step"] for i in ticks])
        ax.set(xlabel="optimizer step", title=f"log10 grad norm of lora_{matrix} (gray: 0)")
        fig.colorbar(image, ax=ax)
    axes[0].set_ylabel("layer.module")
    return fig


def _plot_update_ratio(plt, ratios: dict):
    """The final adapter update-to-weight ratio per layer and module."""
    modules = sorted({k.split(".", 1)[1] for k in ratios})
    layers = sorted({int(k.split(".", 1)[0]) for k in ratios})
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.5), 4))
    width = 0.8 / len(modules)
    for i, module in enumerate(modules):
        ax.bar(
            [layer + (i - (len(modules) - 1) / 2) * width for layer in layers],
            [ratios.get(f"{layer}.{module}", 0.0) for layer in layers],
            width,
            label=module,
        )
    ax.set_xticks(layers)
    ax.set(xlabel="layer", ylabel="||scale·B·A|| / ||W||", title="Adapter update-to-weight ratio (final)")
    ax.legend()
    return fig


def _as_float(value) -> float:
    return float("nan") if value is None else float(value)


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render_report(analysis: dict, plots: dict[str, Path]) -> str:
    """Render report.md from `analyze_run` output and the plot files.

    Args:
        analysis: from `analyze_run`.
        plots: from `plot_run` (paths; linked relative to the report folder).

    Returns:
        The Markdown text.
    """
    conv, over, grad = analysis["convergence"], analysis["overfitting"], analysis["gradients"]
    dead, base = analysis["dead_adapters"], analysis["baseline"]
    lines = [
        f"# Convergence report: {analysis['run_dir']}",
        "",
        f"Run status: **{analysis['status']}**, {analysis['steps_logged']} optimizer steps logged.",
        "",
        "## Verdicts",
        "",
        "| check | verdict | numbers |",
        "|---|---|---|",
        f"| convergence | **{conv['verdict']}** | {conv['reason']} |",
        f"| overfitting | **{'overfitting' if over.get('overfitting') else 'no overfitting'}** | {over['reason']} |",
        f"| gradients | **{grad['verdict']}** | {grad['reason']} |",
        f"| dead adapters | **{len(dead['dead'])}** | threshold {_fmt(dead['threshold'])} "
        f"(1e-3 x median {_fmt(dead['reference_median'])}) |",
        f"| task (sample {'scores' if 'last_scores' in analysis['task'] else 'decisions'}) | "
        f"**{analysis['task']['verdict']}** | {analysis['task']['reason']} |",
    ]
    if base is not None:
        noise = "" if base["val_loss_ci95"] is None else f", validation noise ±{base['val_loss_ci95']:.4f}"
        lines.append(
            f"| vs base model | **{-base['ppl_reduction']:+.1%} ppl** | base {base['baseline_ppl']:.3f} -> best "
            f"{base['best_ppl']:.3f}, loss -{base['loss_delta']:.4f}{noise} |"
        )
    lines += ["", "## Convergence", ""]
    lines += [f"- {k}: {_fmt(conv[k])}" for k in conv if k not in ("verdict", "reason")]
    lines += ["", "## Overfitting and optimal epoch", ""]
    if "best_step" in over:
        lines += [
            f"- optimal point: step {over['best_step']} (epoch {_fmt(over['best_epoch'])}), "
            f"validation loss {over['best_val_loss']:.4f}",
            f"- validation stopped improving after epoch {_fmt(over['best_epoch'])}"
            if over["evals_after_best"]
            else "- validation was still improving at the last evaluation",
            f"- val - train loss gap: {over['gap_at_best']:+.4f} at the best point, "
            f"{over['gap_at_end']:+.4f} at the end",
            f"- evaluations after the best: {over['evals_after_best']}, above it: {over['rising_after_best']}, "
            f"train loss still falling: {over['train_falling']}",
        ]
    else:
        lines.append(f"- {over['reason']}")
    lines += ["", "## Gradients", ""]
    lines += [f"- {k}: {_fmt(grad[k])}" for k in grad if k not in ("verdict", "reason")]
    if dead["a_zero_at_init"]:
        steps = ", ".join(str(step) for step in dead["a_zero_steps"])
        lines.append(
            f"- lora_A gradients are exactly 0 at logged step(s) {steps} because lora_B is initialized to zero (and "
            "the first warmup step has lr 0): expected, not dead; those records are left out of the dead-adapter check"
        )
    lines.append(f"- dead adapter matrices: {', '.join(dead['dead']) if dead['dead'] else 'none'}")
    ratios = analysis["update_ratios"]
    if ratios:
        values = sorted(ratios.values())
        lines.append(
            f"- update-to-weight ratio at the end: median {statistics.median(values):.3g}, "
            f"min {values[0]:.3g}, max {values[-1]:.3g}"
        )
    lines += ["", "## Recommendations", ""] + [f"- {tip}" for tip in analysis["recommendations"]]
    lines += ["", "## Failure modes", ""] + ([f"- {f}" for f in analysis["failure_modes"]] or ["- none detected"])
    lines += ["", "## Plots", ""] + [f"![{name}]({path.name})" for name, path in plots.items()]
    lines += ["", "## Thresholds", "", "| name | value | meaning |", "|---|---|---|"]
    lines += [f"| {k} | {v:g} | {THRESHOLD_NOTES[k]} |" for k, v in THRESHOLDS.items()]
    return "\n".join(lines) + "\n"
