"""Generic evaluation metrics: perplexity with a bootstrap interval, ROUGE, and evaluate.py's report.md.

Everything here is plain Python/numpy on lists of per-example numbers or strings, so each function
can be tested against hand-computed values and copied on its own. What is right for a task (the
default data/task.py: decisions, asking turns) is scored by the task module (docs/task.md).

    from common.metrics import bootstrap_ratio_ci, perplexity, rouge_scores
    perplexity(loss_sums.sum(), token_counts.sum())             # exp(mean cross-entropy)
    bootstrap_ratio_ci(loss_sums, token_counts, n_resamples=1000)  # {"mean", "low", "high", ...}
    rouge_scores(["the cat sat"], ["the cat sat down"])          # {"rouge1", "rouge2", "rougeL"}
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

# exp() of a mean cross-entropy above this overflows float64; a model that bad is reported as inf.
MAX_LOG_PPL = 700.0


def perplexity(loss_sum: float, token_count: float) -> float:
    """Perplexity of summed token cross-entropy: exp(loss_sum / token_count).

    Args:
        loss_sum: cross-entropy (natural log) summed over the scored tokens.
        token_count: number of scored tokens.

    Returns:
        The perplexity (inf when the mean loss is too large to exponentiate).

    Raises:
        ValueError: `token_count` is not positive.
    """
    if token_count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    mean = loss_sum / token_count
    return math.exp(mean) if mean < MAX_LOG_PPL else math.inf


def bootstrap_indices(n_examples: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Draw example indices for a bootstrap, with replacement.

    Share the same indices between the base and the finetuned model so that their difference is a
    paired comparison on identical resamples.

    Args:
        n_examples: number of examples to resample.
        n_resamples: number of bootstrap resamples.
        seed: seed of the numpy generator (the interval is reproducible).

    Returns:
        An int array of shape (n_resamples, n_examples).

    Raises:
        ValueError: no examples or no resamples.
    """
    if n_examples <= 0 or n_resamples <= 0:
        raise ValueError("bootstrap needs at least one example and one resample")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_examples, size=(n_resamples, n_examples))


def bootstrap_ratio_ci(
    numerators: Sequence[float],
    denominators: Sequence[float] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> dict:
    """Percentile bootstrap interval of a ratio of sums, resampling whole examples.

    Mean token cross-entropy is sum(loss_sum) / sum(tokens): long examples weigh more, so we
    resample examples and recompute the ratio of sums rather than averaging per-example means.
    With `denominators=None` this is the interval of the plain mean.

    Args:
        numerators: per-example values (e.g. summed token loss).
        denominators: per-example weights (e.g. scored tokens), or None for all ones.
        n_resamples: bootstrap resamples (ignored when `indices` is given).
        confidence: two-sided coverage, 0.95 for a 95% interval.
        seed: numpy seed for the resamples.
        indices: precomputed `bootstrap_indices`, to pair several statistics on the same resamples.

    Returns:
        {"mean": ratio on the full data, "low", "high": interval bounds, "half_width": (high-low)/2,
         "n": examples, "resamples": number of resamples}.

    Raises:
        ValueError: lengths differ, or there are no examples.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.ones_like(num) if denominators is None else np.asarray(denominators, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size == 0:
        raise ValueError("numerators and denominators must be non-empty 1-D sequences of equal length")
    if indices is None:
        indices = bootstrap_indices(num.size, n_resamples, seed)
    ratios = num[indices].sum(axis=1) / np.maximum(den[indices].sum(axis=1), 1e-12)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return {
        "mean": float(num.sum() / max(den.sum(), 1e-12)),
        "low": float(low),
        "high": float(high),
        "half_width": float((high - low) / 2),
        "n": int(num.size),
        "resamples": int(indices.shape[0]),
    }


def perplexity_from_loss_ci(loss_ci: dict) -> dict:
    """Map a mean-loss interval to a perplexity interval (exp is monotone, so bounds map to bounds).

    Args:
        loss_ci: the dict returned by `bootstrap_ratio_ci` for the mean token loss.

    Returns:
        {"value", "low", "high"} perplexities.
    """

    def to_ppl(x: float) -> float:
        return math.exp(x) if x < MAX_LOG_PPL else math.inf

    return {"value": to_ppl(loss_ci["mean"]), "low": to_ppl(loss_ci["low"]), "high": to_ppl(loss_ci["high"])}


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measure (rouge-score package, Porter stemming, no network).

    Args:
        predictions: generated replies.
        references: reference replies, aligned with `predictions`.

    Returns:
        {"rouge1", "rouge2", "rougeL"} averaged over examples (0.0 for empty inputs).

    Raises:
        ValueError: the two lists differ in length.
    """
    from rouge_score import rouge_scorer, tokenizers

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    keys = ("rouge1", "rouge2", "rougeL")
    if not predictions:
        return dict.fromkeys(keys, 0.0)
    # Passing the default tokenizer explicitly (with Porter stemming) avoids an INFO line per call.
    scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
    totals = dict.fromkeys(keys, 0.0)
    for prediction, reference in zip(predictions, references):
        # score(target, prediction): the reference comes first
        scores = scorer.score(reference, prediction)
        for key in keys:
            totals[key] += scores[key].fmeasure
    return {key: totals[key] / len(predictions) for key in keys}


def value_with_interval(value: float, interval: dict | None) -> str:
    """ "0.930 [0.880, 0.970]", or the bare value when there is no interval."""
    return f"{value:.3f}" if not interval else f"{value:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def table_head(first: str, names: list[str], with_delta: bool) -> list[str]:
    """The header and separator of a report table: a column per model, then "finetuned - base" if asked."""
    return [
        f"| {first} | " + " | ".join(names) + (" | finetuned - base |" if with_delta else " |"),
        "|---" * (len(names) + 1 + with_delta) + "|",
    ]


def table_row(label: str, cells: list[str], delta: str | None = None) -> str:
    """One row of a report table; the difference cell only when `delta` is given."""
    return f"| {label} | " + " | ".join(cells) + (f" | {delta} |" if delta is not None else " |")


def render_eval_report(metrics: dict, samples: Sequence[dict] = (), task_lines: Sequence[str] = ()) -> str:
    """Render report.md of evaluate.py: the base-vs-finetuned table, how sure, the task's sections, samples.

    Args:
        metrics: the metrics.json content written by evaluate.py.
        samples: a few predictions.jsonl lines to show (reference and generated replies).
        task_lines: the task module's `report_lines`: its leading table rows ("| ...") continue the
            main table, the rest follows the loss comparison.

    Returns:
        The Markdown text.
    """
    results = metrics["models"]
    names = list(results)
    comparison = metrics.get("comparison")
    title = f"{metrics['adapter']} vs its base {metrics['model']}" if metrics["adapter"] else metrics["model"]
    task_rows = list(itertools.takewhile(lambda line: line.startswith("|"), task_lines))
    lines = [
        f"# Evaluation: {title}",
        "",
        f"Data: `{metrics['data_file']}`, {metrics['examples']} examples ({metrics['loss_examples']} scored for loss, "
        f"{metrics['generation_examples']} generated). "
        f"Greedy decoding, max {metrics['settings']['max_new_tokens']} new tokens{_loop_note(metrics)}, "
        f"{metrics['settings']['dtype']}. "
        f"Intervals: 95% bootstrap over examples ({metrics['settings']['bootstrap']} resamples).",
        "",
        *table_head("metric", names, bool(comparison)),
        *_metric_rows(results, names, comparison),
        *task_rows,
    ]
    if comparison:
        lines += _confidence_lines(comparison["loss_delta"], comparison["significant"])
    lines += task_lines[len(task_rows) :]
    if samples:
        lines += _sample_lines(samples, names)
    return "\n".join(lines) + "\n"


def _loop_note(metrics: dict) -> str:
    """The report's words for `--loop-repeats`: ", a reply ended once it wrote one span of 8+ tokens 3 times in a
    row (base 79, finetuned 0 replies)", or "" when it was off."""
    repeats = metrics["settings"].get("loop_repeats", 0)
    if not repeats:
        return ""
    counts = ", ".join(
        f"{name} {result['generation'].get('looped', 0)}"
        for name, result in metrics["models"].items()
        if "generation" in result
    )
    span = metrics["settings"]["loop_span"]
    return f", a reply ended once it wrote one span of {span}+ tokens {repeats} times in a row" + (
        f" ({counts} replies)" if counts else ""
    )


def _interval(ci: dict, key: str = "mean", digits: int = 4) -> str:
    return f"{ci[key]:.{digits}g} [{ci['low']:.{digits}g}, {ci['high']:.{digits}g}]"


def _metric_rows(results: dict, names: list[str], comparison: dict | None) -> list[str]:
    """Loss, perplexity, ROUGE and the mean task scores (`scores`, when there) of every model."""
    lines = [
        table_row(
            "mean cross-entropy (assistant tokens)",
            [_interval(results[n]["loss"]) for n in names],
            _interval(comparison["loss_delta"]) if comparison else None,
        ),
        table_row(
            "perplexity",
            [_interval(results[n]["perplexity"], "value") for n in names],
            f"x{comparison['perplexity_ratio']:.3f}" if comparison else None,
        ),
    ]
    if "rouge" in results[names[0]]:
        for label, key in [("ROUGE-1", "rouge1"), ("ROUGE-2", "rouge2"), ("ROUGE-L", "rougeL")]:
            values = [results[n]["rouge"][key] for n in names]
            delta = f"{values[-1] - values[0]:+.3f}" if comparison else None
            lines.append(table_row(label, [f"{v:.3f}" for v in values], delta))
    scores = results[names[0]].get("scores", {})  # the mean task scores of a task without its own metrics
    for key in [k for k in scores if k != "n" and all(k in results[n].get("scores", {}) for n in names)]:
        values = [results[n]["scores"][key] for n in names]
        delta = f"{values[-1]['mean'] - values[0]['mean']:+.3f}" if comparison else None
        lines.append(table_row(f"{key} (task score)", [value_with_interval(v["mean"], v) for v in values], delta))
    return lines


def _confidence_lines(delta: dict, significant: bool) -> list[str]:
    """How sure: the paired loss difference and whether its interval excludes 0."""
    verdict = (
        "the interval excludes 0, so the difference is not resampling noise"
        if significant
        else "the interval includes 0: on these examples the two models cannot be told apart"
    )
    return [
        "",
        f"How sure: the finetuned model's mean loss is {'lower' if delta['mean'] < 0 else 'higher'} than the "
        f"base's by {abs(delta['mean']):.4f} nats/token "
        f"(95% CI of finetuned - base [{delta['low']:+.4f}, {delta['high']:+.4f}], "
        f"paired bootstrap over {delta['n']} examples); "
        f"{verdict}.",
    ]


def _sample_lines(samples: Sequence[dict], names: list[str]) -> list[str]:
    """A few predictions: the reference and each model's reply."""
    lines = ["", "## Sample predictions", ""]
    for sample in samples:
        lines += [f"### {sample['id']}", "", "Reference:", "```", sample["reference"], "```"]
        for n in names:
            lines += [f"{n}:", "```", sample.get(f"generated_{n}", ""), "```"]
        lines.append("")
    return lines
