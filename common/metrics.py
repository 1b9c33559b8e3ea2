"""Evaluation metrics: perplexity with a bootstrap interval, ROUGE, and decision accuracy.

Everything here is plain Python/numpy on lists of per-example numbers or strings, so each function
can be tested against hand-computed values and copied on its own.

    from common.metrics import bootstrap_ratio_ci, perplexity, rouge_scores, decision_metrics
    perplexity(loss_sums.sum(), token_counts.sum())             # exp(mean cross-entropy)
    bootstrap_ratio_ci(loss_sums, token_counts, n_resamples=1000)  # {"mean", "low", "high", ...}
    rouge_scores(["the cat sat"], ["the cat sat down"])          # {"rouge1", "rouge2", "rougeL"}
    decision_metrics(generated_replies, reference_decisions, lines_of_business)

Conventions: a reply whose decision line cannot be parsed counts as wrong for the accuracies and as
citing no rule for the rule F1 (so a model cannot score well by staying silent); the parse rate is
reported next to them. Rule F1 is micro-averaged: true/false positives and false negatives are
summed over all examples before precision and recall are computed. Where the references carry
approval conditions, the condition accuracy is over the reference approvals: the reply approves and
names exactly the rulebook's conditions ("Condition: ..." in its outcome sentence, none where none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.decision import OUTCOMES, RISK_CLASSES, parse_asked_facts, parse_conditions, parse_decision_line

UNPARSED = "unparsed"
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


def rule_citation_f1(predicted: Sequence[Sequence[str] | None], reference: Sequence[Sequence[str]]) -> dict:
    """Micro-averaged precision, recall and F1 of cited rule ids against the reference rules.

    Args:
        predicted: per example, the rule ids the model cited (None or [] when it cited none).
        reference: per example, the rule ids that actually applied.

    Returns:
        {"precision", "recall", "f1", "tp", "fp", "fn"}; a metric with a zero denominator is 0.0.
    """
    tp = fp = fn = 0
    for cited, truth in zip(predicted, reference):
        cited_set, truth_set = set(cited or ()), set(truth or ())
        tp += len(cited_set & truth_set)
        fp += len(cited_set - truth_set)
        fn += len(truth_set - cited_set)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def confusion_matrix(reference: Sequence[str], predicted: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Count (reference, predicted) pairs; a None prediction lands in an extra "unparsed" column.

    Args:
        reference: true labels.
        predicted: predicted labels, None when the reply could not be parsed.
        labels: row labels in display order; predictions outside them are added as columns.

    Returns:
        {"labels": row labels, "columns": column labels, "matrix": rows of counts}, where
        matrix[i][j] counts examples whose reference is labels[i] and prediction columns[j].
    """
    rows = list(labels)
    extra = sorted({p for p in predicted if p is not None and p not in rows})
    columns = [*rows, *extra, UNPARSED]
    matrix = [[0] * len(columns) for _ in rows]
    for truth, guess in zip(reference, predicted):
        if truth not in rows:
            continue
        column = columns.index(UNPARSED if guess is None else guess)
        matrix[rows.index(truth)][column] += 1
    return {"labels": rows, "columns": columns, "matrix": matrix}


def score_decisions(parsed: Sequence[dict | None], reference: Sequence[dict]) -> dict:
    """Parse rate, outcome accuracy, risk-class accuracy and rule F1 of parsed decisions.

    Args:
        parsed: per example, `parse_decision_line` of the generated reply (None if unparsable).
        reference: per example, the reference decision {"outcome", "risk_class", "rules"}.

    Returns:
        {"n", "parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_precision",
         "rule_recall", "rule_f1"}; accuracies are over all n examples (unparsed = wrong). Where
        every reference has "conditions" and the parsed decisions carry them (`decision_metrics`
        adds them), also "condition_accuracy" over the `n_approvals` reference approvals (None
        when there are none).
    """
    n = len(reference)
    if n == 0:
        return {"n": 0}
    outcome_hits = sum(p is not None and p["outcome"] == r["outcome"] for p, r in zip(parsed, reference))
    class_hits = sum(p is not None and p["risk_class"] == r["risk_class"] for p, r in zip(parsed, reference))
    rules = rule_citation_f1([p["rules"] if p else None for p in parsed], [r.get("rules", []) for r in reference])
    scores = {
        "n": n,
        "parse_rate": sum(p is not None for p in parsed) / n,
        "outcome_accuracy": outcome_hits / n,
        "risk_class_accuracy": class_hits / n,
        "rule_precision": rules["precision"],
        "rule_recall": rules["recall"],
        "rule_f1": rules["f1"],
    }
    hits = condition_hits(parsed, reference)
    if hits is not None:
        scores["n_approvals"] = int(sum(hits[1]))
        scores["condition_accuracy"] = sum(hits[0]) / scores["n_approvals"] if scores["n_approvals"] else None
    return scores


def condition_hits(parsed: Sequence[dict | None], reference: Sequence[dict]) -> tuple[list, list] | None:
    """Per example, whether a reference approval got its approval conditions right.

    Args:
        parsed: per example, a parsed decision with "conditions" (`decision_metrics` adds them), or None.
        reference: per example, the reference decision with "conditions".

    Returns:
        (hits, is_approval), two lists of 0.0/1.0: a hit is a reference approval whose reply approves
        and names exactly its conditions (order and case ignored). None when a reference has no
        "conditions" or a parsed decision was not given its conditions (nothing to score).
    """
    if any("conditions" not in r for r in reference) or any(p is not None and "conditions" not in p for p in parsed):
        return None
    is_approval = [float(r["outcome"] == "approve") for r in reference]
    hits = [
        float(
            r["outcome"] == p["outcome"] == "approve"
            and sorted(p["conditions"]) == sorted(c.lower() for c in r["conditions"])
        )
        if p is not None
        else 0.0
        for p, r in zip(parsed, reference)
    ]
    return hits, is_approval


def decision_metrics(
    generated: Sequence[str], reference: Sequence[dict], lines_of_business: Sequence[str] | None = None
) -> dict:
    """Decision accuracy of generated replies: overall, per line of business, and confusion matrices.

    Args:
        generated: the generated final replies (the decision line is parsed from each).
        reference: per example, the reference decision {"outcome", "risk_class", "rules"}.
        lines_of_business: per example, the record's `line_of_business` (None for no breakdown).

    Returns:
        {"overall": `score_decisions` dict, "by_line_of_business": {lob: dict},
         "outcome_confusion": `confusion_matrix` dict, "risk_class_confusion": dict,
         "parsed": the parsed decision of each reply, with the conditions it names (None where
         unparsable)}.

    Raises:
        ValueError: the inputs differ in length.
    """
    if len(generated) != len(reference) or (lines_of_business is not None and len(lines_of_business) != len(generated)):
        raise ValueError("generated, reference and lines_of_business must have the same length")
    parsed = [parse_decision_line(text) for text in generated]
    for decision, text in zip(parsed, generated):
        if decision is not None:
            decision["conditions"] = parse_conditions(text)
    by_lob = {}
    if lines_of_business is not None:
        for lob in sorted(set(lines_of_business)):
            keep = [i for i, value in enumerate(lines_of_business) if value == lob]
            by_lob[lob] = score_decisions([parsed[i] for i in keep], [reference[i] for i in keep])
    classes = [*RISK_CLASSES, *sorted({r["risk_class"] for r in reference} - set(RISK_CLASSES))]
    return {
        "overall": score_decisions(parsed, reference),
        "by_line_of_business": by_lob,
        "outcome_confusion": confusion_matrix(
            [r["outcome"] for r in reference], [p["outcome"] if p else None for p in parsed], OUTCOMES
        ),
        "risk_class_confusion": confusion_matrix(
            [r["risk_class"] for r in reference], [p["risk_class"] if p else None for p in parsed], classes
        ),
        "parsed": parsed,
    }


def _cell(values: list[float | None], digits: int = 3) -> str:
    """Join one number per model as "base / finetuned" (a single number in base-only mode)."""
    return " / ".join("n/a" if v is None else f"{v:.{digits}f}" for v in values)


def _value_with_interval(value: float, interval: dict | None) -> str:
    """ "0.930 [0.880, 0.970]", or the bare value when there is no interval."""
    return f"{value:.3f}" if not interval else f"{value:.3f} [{interval['low']:.3f}, {interval['high']:.3f}]"


def render_eval_report(metrics: dict, samples: Sequence[dict] = ()) -> str:
    """Render report.md of evaluate.py: the base-vs-finetuned table, per line of business, confusions.

    Args:
        metrics: the metrics.json content written by evaluate.py.
        samples: a few predictions.jsonl lines to show (reference and generated replies).

    Returns:
        The Markdown text.
    """
    results = metrics["models"]
    names = list(results)
    comparison = metrics.get("comparison")
    title = f"{metrics['adapter']} vs its base {metrics['model']}" if metrics["adapter"] else metrics["model"]
    lines = [
        f"# Evaluation: {title}",
        "",
        f"Data: `{metrics['data_file']}`, {metrics['examples']} examples ({metrics['loss_examples']} scored for loss, "
        f"{metrics['generation_examples']} generated, {metrics['decision_examples']} with a reference decision). "
        f"Greedy decoding, max {metrics['settings']['max_new_tokens']} new tokens, {metrics['settings']['dtype']}. "
        f"Intervals: 95% bootstrap over examples ({metrics['settings']['bootstrap']} resamples).",
        "",
        *_table_head("metric", names, comparison),
    ]
    lines += _metric_rows(results, names, comparison)
    lines += _asking_turn_lines(results, names, comparison)
    if comparison:
        lines += _confidence_lines(comparison["loss_delta"], comparison["significant"])
    decision = {n: results[n].get("decision") for n in names}
    if all(decision.values()):
        lines += _line_of_business_lines(decision, names)
        for key, label in [("outcome_confusion", "Outcome"), ("risk_class_confusion", "Risk class")]:
            lines += _confusion_lines(decision, names, key, label)
    if samples:
        lines += _sample_lines(samples, names)
    return "\n".join(lines) + "\n"


def _table_head(first: str, names: list[str], comparison: dict | None) -> list[str]:
    return [
        f"| {first} | " + " | ".join(names) + (" | finetuned - base |" if comparison else " |"),
        "|---" * (len(names) + 1 + bool(comparison)) + "|",
    ]


def _row(label: str, values: list[str], delta: str, comparison: dict | None) -> str:
    return f"| {label} | " + " | ".join(values) + (f" | {delta} |" if comparison else " |")


def _interval(ci: dict, key: str = "mean", digits: int = 4) -> str:
    return f"{ci[key]:.{digits}g} [{ci['low']:.{digits}g}, {ci['high']:.{digits}g}]"


REPORT_DECISION_ROWS = [
    ("decision parse rate", "parse_rate"),
    ("outcome accuracy", "outcome_accuracy"),
    ("risk-class accuracy", "risk_class_accuracy"),
    ("rule-citation precision", "rule_precision"),
    ("rule-citation recall", "rule_recall"),
    ("rule-citation F1", "rule_f1"),
    ("approval conditions right (reference approvals)", "condition_accuracy"),
]


def _metric_rows(results: dict, names: list[str], comparison: dict | None) -> list[str]:
    """Loss, perplexity, ROUGE, the decision metrics and re-asking at the decision turn, per model."""
    lines = [
        _row(
            "mean cross-entropy (assistant tokens)",
            [_interval(results[n]["loss"]) for n in names],
            _interval(comparison["loss_delta"]) if comparison else "",
            comparison,
        ),
        _row(
            "perplexity",
            [_interval(results[n]["perplexity"], "value") for n in names],
            f"x{comparison['perplexity_ratio']:.3f}" if comparison else "",
            comparison,
        ),
    ]
    scalar_rows = [("ROUGE-1", "rouge", "rouge1"), ("ROUGE-2", "rouge", "rouge2"), ("ROUGE-L", "rouge", "rougeL")]
    scalar_rows += [(label, "decision", key) for label, key in REPORT_DECISION_ROWS]
    for label, group, key in scalar_rows:
        if group not in results[names[0]]:
            continue
        values = [
            results[n][group]["overall"].get(key) if group == "decision" else results[n][group][key] for n in names
        ]
        if None in values:  # no condition accuracy: references without conditions, or no approvals
            continue
        intervals = [results[n].get("decision_ci", {}).get(key) for n in names]
        if key == "outcome_accuracy" and not all(intervals):  # metrics.json written before decision_ci existed
            intervals = [results[n]["outcome_accuracy_ci"] for n in names]
        cells = [_value_with_interval(v, ci) for v, ci in zip(values, intervals)]
        lines.append(_row(label, cells, f"{values[-1] - values[0]:+.3f}" if comparison else "", comparison))
    if all("asks_at_decision_rate" in results[n] for n in names):
        values = [results[n]["asks_at_decision_rate"] for n in names]
        delta = f"{values[-1] - values[0]:+.3f}" if comparison else ""
        lines.append(_row("decision turn asks again instead", [f"{v:.3f}" for v in values], delta, comparison))
    return lines


def _asking_turn_lines(results: dict, names: list[str], comparison: dict | None) -> list[str]:
    """The asking-turn table (precision, recall, exact asks, early decisions), when every model has one."""
    asks = {n: results[n].get("asks") for n in names}
    if not all(a and a["n_turns"] for a in asks.values()):
        return []
    lines = [
        "",
        f"Asking turns: {asks[names[0]]['n_turns']} intermediate assistant turns, each generated from the "
        "conversation before it and scored on the facts it asks for (the names the dataset uses) against "
        "the facts still missing there.",
        "",
        *_table_head("asking-turn metric", names, comparison),
    ]
    for label, key in [
        ("ask precision (asked facts that are missing)", "ask_precision"),
        ("ask recall (missing facts asked for)", "ask_recall"),
        ("asks for exactly the missing facts", "exact_rate"),
        ("decides too early (DECISION at an asking turn)", "early_decision_rate"),
    ]:
        values = [asks[n][key] for n in names]
        cells = [_value_with_interval(v, asks[n][f"{key}_ci"]) for v, n in zip(values, names)]
        lines.append(_row(label, cells, f"{values[-1] - values[0]:+.3f}" if comparison else "", comparison))
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


def _line_of_business_lines(decision: dict, names: list[str]) -> list[str]:
    """The decision metrics per line of business, all models in one cell."""
    lines = ["", f"## Per line of business ({' / '.join(names)})", ""]
    lines += [
        "| line of business | n | parse rate | outcome acc. | risk-class acc. | rule F1 |",
        "|---|---|---|---|---|---|",
    ]
    for lob, first in decision[names[0]]["by_line_of_business"].items():
        per = [decision[n]["by_line_of_business"][lob] for n in names]
        cells = [
            _cell([p[key] for p in per]) for key in ("parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1")
        ]
        lines.append(f"| {lob} | {first['n']} | " + " | ".join(cells) + " |")
    return lines


def _confusion_lines(decision: dict, names: list[str], key: str, label: str) -> list[str]:
    """One confusion matrix (rows: reference, columns: predicted), every model's count in each cell."""
    confusion = decision[names[0]][key]
    columns = list(dict.fromkeys(c for n in names for c in decision[n][key]["columns"]))
    lines = ["", f"## {label} confusion (rows: reference, columns: predicted; cells {' / '.join(names)})", ""]
    lines += ["| reference | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for i, label_row in enumerate(confusion["labels"]):
        cells = []
        for column in columns:
            counts = []
            for n in names:
                matrix = decision[n][key]
                j = matrix["columns"].index(column) if column in matrix["columns"] else None
                counts.append(0 if j is None else matrix["matrix"][i][j])
            cells.append(" / ".join(str(c) for c in counts))
        lines.append(f"| {label_row} | " + " | ".join(cells) + " |")
    return lines


def _sample_lines(samples: Sequence[dict], names: list[str]) -> list[str]:
    """A few predictions: the reference and each model's reply."""
    lines = ["", "## Sample predictions", ""]
    for sample in samples:
        lines += [
            f"### {sample['id']} ({sample['line_of_business']})",
            "",
            "Reference:",
            "```",
            sample["reference"],
            "```",
        ]
        for n in names:
            lines += [f"{n}:", "```", sample.get(f"generated_{n}", ""), "```"]
        lines.append("")
    return lines


def decision_intervals(parsed: Sequence[dict | None], reference: Sequence[dict], indices: np.ndarray) -> dict:
    """95% bootstrap intervals of the decision metrics, resampling examples.

    Args:
        parsed: per example, `parse_decision_line` of the reply (None when unparsable).
        reference: per example, the reference decision {"outcome", "risk_class", "rules"}.
        indices: `bootstrap_indices(len(reference), ...)`; share them between models to pair them.

    Returns:
        {"parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1"}, each a
        `bootstrap_ratio_ci` dict. Rule F1 is resampled as the ratio of sums 2TP / (2TP + FP + FN),
        which is the micro F1 of `rule_citation_f1` on every resample. With conditions on both sides
        (`condition_hits`) and at least one reference approval, also "condition_accuracy", resampled
        as hits over approvals.

    Raises:
        ValueError: the inputs differ in length or are empty.
    """
    if len(parsed) != len(reference) or not reference:
        raise ValueError("parsed and reference must be non-empty and of the same length")
    hits = {"parse_rate": [], "outcome_accuracy": [], "risk_class_accuracy": []}
    f1_num, f1_den = [], []
    for guess, truth in zip(parsed, reference):
        hits["parse_rate"].append(float(guess is not None))
        hits["outcome_accuracy"].append(float(guess is not None and guess["outcome"] == truth["outcome"]))
        hits["risk_class_accuracy"].append(float(guess is not None and guess["risk_class"] == truth["risk_class"]))
        counts = rule_citation_f1([guess["rules"] if guess else None], [truth.get("rules", [])])
        f1_num.append(2.0 * counts["tp"])
        f1_den.append(2.0 * counts["tp"] + counts["fp"] + counts["fn"])
    intervals = {key: bootstrap_ratio_ci(values, indices=indices) for key, values in hits.items()}
    intervals["rule_f1"] = bootstrap_ratio_ci(f1_num, f1_den, indices=indices)
    conditions = condition_hits(parsed, reference)
    if conditions is not None and sum(conditions[1]):
        intervals["condition_accuracy"] = bootstrap_ratio_ci(*conditions, indices=indices)
    return intervals


def ask_metrics(
    generated: Sequence[str], expected: Sequence[Sequence[str]], n_resamples: int = 1000, seed: int = 0
) -> dict:
    """Score the asking turns: does each reply ask for exactly the facts still missing?

    Asked facts are read with `parse_asked_facts` (the names the dataset's assistant uses). A reply
    that contains a DECISION line at an asking turn has decided too early.

    Args:
        generated: one generated reply per asking turn.
        expected: per turn, the fact keys still missing there (the record's `ask_facts`).
        n_resamples: bootstrap resamples for the intervals (turns are resampled).
        seed: seed of the resamples.

    Returns:
        {"n_turns", "ask_precision", "ask_recall", "exact_rate", "early_decision_rate", and the
        same four with an "_ci" suffix (`bootstrap_ratio_ci` dicts)}; precision and recall are
        micro-averaged over fact names (asked and right / asked, asked and right / missing).
        {"n_turns": 0} when there are no asking turns.

    Raises:
        ValueError: the inputs differ in length.
    """
    if len(generated) != len(expected):
        raise ValueError("generated and expected must have the same length")
    if not generated:
        return {"n_turns": 0}
    right, asked, missing, exact, early = [], [], [], [], []
    for reply, wanted in zip(generated, expected):
        got, wanted = parse_asked_facts(reply), set(wanted)
        right.append(float(len(got & wanted)))
        asked.append(float(len(got)))
        missing.append(float(len(wanted)))
        exact.append(float(got == wanted))
        early.append(float(parse_decision_line(reply) is not None))
    indices = bootstrap_indices(len(generated), n_resamples, seed)
    intervals = {
        "ask_precision": bootstrap_ratio_ci(right, asked, indices=indices),
        "ask_recall": bootstrap_ratio_ci(right, missing, indices=indices),
        "exact_rate": bootstrap_ratio_ci(exact, indices=indices),
        "early_decision_rate": bootstrap_ratio_ci(early, indices=indices),
    }
    result: dict = {"n_turns": len(generated)}
    for key, interval in intervals.items():
        result[key] = interval["mean"]
        result[f"{key}_ci"] = interval
    return result


def asks_at_decision_rate(generated: Sequence[str]) -> float:
    """Share of final (decision) replies that ask for facts instead of deciding: no DECISION line
    parses and at least one fact is asked for. Each such reply fails twice: no decision, a wrong ask.

    Args:
        generated: the generated final replies.

    Returns:
        The share in [0, 1] (0.0 for no replies).
    """
    asking = [parse_decision_line(t) is None and bool(parse_asked_facts(t)) for t in generated]
    return sum(asking) / len(asking) if asking else 0.0


def score_samples(replies: Sequence[str], reference: Sequence[dict | None]) -> dict:
    """Score the few sample replies train.py generates at each validation, as evaluate.py would.

    Args:
        replies: the generated final replies.
        reference: per reply, the record's reference decision, or None (a record without one).

    Returns:
        {"sample_n": replies with a reference decision, "sample_parse_rate", "sample_outcome_accuracy"};
        the rates are None when no reply has a reference decision.
    """
    pairs = [(parse_decision_line(r), d) for r, d in zip(replies, reference) if d]
    if not pairs:
        return {"sample_n": 0, "sample_parse_rate": None, "sample_outcome_accuracy": None}
    return {
        "sample_n": len(pairs),
        "sample_parse_rate": sum(p is not None for p, _ in pairs) / len(pairs),
        "sample_outcome_accuracy": sum(p is not None and p["outcome"] == d["outcome"] for p, d in pairs) / len(pairs),
    }
