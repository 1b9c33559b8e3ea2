"""The underwriting task: the DECISION line, how replies are scored, and evaluate.py's decision report.

train.py and evaluate.py load this file with `--task` (default data/task.py) and call only the
interface of docs/task.md; everything underwriting-specific lives here (and in data/rulebook.py):

    score_reply(reply, record)          train.py's sample scores: parse rate, outcome accuracy
    extra_prompts(records)              the asking turns, with the facts each should ask for
    evaluate_replies(replies, records, n_resamples, seed, extra_replies)   decision metrics, asking
                                        turns, facts asked again, with 95% intervals
    prediction_fields(record, replies)  predictions.jsonl columns: the reference and parsed decisions
    report_lines(results, names)        report.md rows and sections: decisions, asking turns, confusions

Every underwriting reply ends with a machine-readable line, written by the generator with
`format_decision_line` (strict) and read back with `parse_decision_line` (lenient about case and
spacing, the last matching line wins):

    DECISION: approve | CLASS: preferred | RULES: L-3, L-7

    python -c "from data.task import parse_decision_line as p; print(p('Refer.\\ndecision: REFER | class: n/a | rules: h-3'))"

Scoring conventions: an unparsable reply counts as wrong for the accuracies and as citing no rule
(so silence never scores well); rule F1 is micro-averaged over all examples; where the references
carry approval conditions, the condition accuracy is over the reference approvals (the reply
approves and names exactly the rulebook's conditions, "Condition: ..." in its outcome sentence);
a turn asks again when its reply names a fact given before it (the record's `facts` less those its
`ask_facts` still list as missing there), a decision reply included.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from common.metrics import bootstrap_indices, bootstrap_ratio_ci, table_head, table_row, value_with_interval
from data.rulebook import OUTCOMES, RISK_CLASSES

UNPARSED = "unparsed"
# One line, three "|"-separated fields in a fixed order; the field values are checked afterwards.
DECISION_LINE = re.compile(
    r"^\s*DECISION\s*:\s*(?P<outcome>[^|]*?)\s*\|"
    r"\s*CLASS\s*:\s*(?P<risk_class>[^|]*?)\s*\|"
    r"\s*RULES\s*:\s*(?P<rules>[^|]*?)\s*\.?\s*$",
    re.IGNORECASE,
)
RULE_ID = re.compile(r"^([A-Za-z])\s*-\s*(\d+)$")
# The approval conditions of the outcome sentence: "Approve at standard. Condition: roof inspection
# within 30 days." or "Subject to: a; b." (the dataset writes both; several are joined by "; ").
CONDITION_PHRASE = re.compile(
    r"(?:^|[.!]\s+)(?:condition|subject to)\s*:\s*(?P<conditions>[^\n]*?)\s*\.?\s*$", re.I | re.M
)
# What the assistant calls each fact when it asks for it (the generator writes these words; the
# asking turns are scored by reading them back).
FACT_ASK_NAMES = {
    "age": "the applicant's age",
    "face_amount": "the face amount",
    "bmi": "the BMI",
    "smoker": "smoking status",
    "medical_history": "the medical history",
    "occupation": "the occupation",
    "construction": "the construction type",
    "roof_age": "the roof age",
    "fire_station_miles": "the fire station distance",
    "hydrant_feet": "the hydrant distance",
    "prior_claims": "the 5-year claims count",
    "wind_zone": "the wind zone",
    "dwelling_value": "the dwelling value",
    "occupancy": "the occupancy",
    "sprinklered": "sprinkler status",
    "building_age": "the building age",
    "wiring_updated": "wiring status",
    "annual_revenue": "the annual revenue",
    "tiv": "the total insured value",
    "prior_losses": "the 5-year loss count",
}
REPORT_DECISION_ROWS = [
    ("decision parse rate", "parse_rate"),
    ("outcome accuracy", "outcome_accuracy"),
    ("risk-class accuracy", "risk_class_accuracy"),
    ("rule-citation precision", "rule_precision"),
    ("rule-citation recall", "rule_recall"),
    ("rule-citation F1", "rule_f1"),
    ("approval conditions right (reference approvals)", "condition_accuracy"),
]
REPORT_ASK_ROWS = [
    ("ask precision (asked facts that are missing)", "ask_precision"),
    ("ask recall (missing facts asked for)", "ask_recall"),
    ("asks for exactly the missing facts", "exact_rate"),
    ("decides too early (DECISION at an asking turn)", "early_decision_rate"),
]


# --- the decision line ---
def format_decision_line(outcome: str, risk_class: str, rules: list[str]) -> str:
    """Write the decision line, e.g. "DECISION: approve | CLASS: preferred | RULES: L-3, L-7".

    Raises:
        ValueError: unknown outcome or class, a class that does not fit the outcome (only approvals
            have one; the others "n/a"), no rules, or a rule id not like "L-3".
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
    if risk_class not in RISK_CLASSES:
        raise ValueError(f"risk class {risk_class!r} is not one of {RISK_CLASSES}")
    if (outcome == "approve") == (risk_class == "n/a"):
        raise ValueError(f"risk class {risk_class!r} does not fit outcome {outcome!r}; only approvals have a class")
    if not rules:
        raise ValueError("a decision must cite at least one rule")
    for rule_id in rules:
        if not re.fullmatch(r"[A-Z]-\d+", rule_id):
            raise ValueError(f"rule id {rule_id!r} is not like 'L-3'")
    return f"DECISION: {outcome} | CLASS: {risk_class} | RULES: {', '.join(rules)}"


def parse_rule_ids(text: str) -> list[str] | None:
    """Parse "L-3, l - 7" into ["L-3", "L-7"]; None when any item is not a rule id."""
    rules = []
    for item in text.split(","):
        match = RULE_ID.match(item.strip())
        if match is None:
            return None
        rules.append(f"{match.group(1).upper()}-{int(match.group(2))}")
    return rules


def parse_decision_line(text: str) -> dict | None:
    """The last well-formed decision line of a reply ("decision : Approve|class:STANDARD|rules: l-8." reads too).

    The class is not checked against the outcome, so a reply with the right outcome but an
    inconsistent class is still scored on its outcome.

    Returns:
        {"outcome", "risk_class", "rules": ["L-3", ...]} normalized, or None when no line has the
        format (a field missing, an unknown outcome or class, an empty or malformed rule list).
    """
    for line in reversed(text.splitlines()):
        match = DECISION_LINE.match(line)
        if match is None:
            continue
        outcome = match.group("outcome").lower()
        risk_class = re.sub(r"\s+", "", match.group("risk_class").lower())
        rules = parse_rule_ids(match.group("rules"))
        if outcome in OUTCOMES and risk_class in RISK_CLASSES and rules:
            return {"outcome": outcome, "risk_class": risk_class, "rules": rules}
    return None


def parse_conditions(text: str) -> list[str]:
    """The approval conditions of the last "Condition: ..." / "Subject to: ..." phrase, lowercased, split on ";"."""
    matches = CONDITION_PHRASE.findall(text)
    if not matches:
        return []
    return [part.strip().lower() for part in matches[-1].split(";") if part.strip()]


def parse_asked_facts(text: str) -> set[str]:
    """The fact keys a reply asks for by their `FACT_ASK_NAMES` (case ignored), e.g. {"bmi", "smoker"}."""
    lowered = text.lower()
    return {key for key, name in FACT_ASK_NAMES.items() if name.lower() in lowered}


def reference_decision(record: dict) -> dict | None:
    """The record's stored decision; else the decision line of its final assistant turn (None: neither)."""
    decision = record.get("decision")
    if isinstance(decision, dict) and "outcome" in decision:
        return decision
    return parse_decision_line([m for m in record["messages"] if m["role"] == "assistant"][-1]["content"])


def _asking_turns(record: dict) -> list[tuple[int, list[str]]]:
    """(message index, facts still missing) of each intermediate assistant turn of a record with `ask_facts`."""
    asks = record.get("ask_facts")
    if not isinstance(asks, list):
        return []
    return list(zip([i for i, m in enumerate(record["messages"]) if m["role"] == "assistant"][:-1], asks))


def given_facts(record: dict) -> list[set[str]] | None:
    """The fact keys given before each asking turn, then before the final turn (all of the record's `facts`).

    None when the record does not say: no `facts` dict, or not one `ask_facts` list per asking turn.
    """
    facts, asks = record.get("facts"), record.get("ask_facts")
    n_asking = sum(m["role"] == "assistant" for m in record["messages"]) - 1
    if not isinstance(facts, dict) or not isinstance(asks, list) or len(asks) != n_asking:
        return None
    return [set(facts) - set(missing) for missing in asks] + [set(facts)]


# --- the task interface (docs/task.md) ---
def score_reply(reply: str, record: dict) -> dict[str, float] | None:
    """Whether the reply's DECISION line parses and names the reference outcome (None: no reference)."""
    reference = record.get("decision")
    if not reference:
        return None
    parsed = parse_decision_line(reply)
    return {
        "parse_rate": float(parsed is not None),
        "outcome_accuracy": float(bool(parsed) and parsed["outcome"] == reference["outcome"]),
    }


def extra_prompts(records: Sequence[dict]) -> list[dict]:
    """The asking turns: per intermediate assistant turn of a record with `ask_facts`, the conversation before it.

    Returns:
        [{"id", "turn" (1, 2, ...), "expected": the fact keys still missing there, "messages"}, ...].
    """
    prompts = []
    for record in records:
        for number, (index, facts) in enumerate(_asking_turns(record), start=1):
            record_id = record.get("id", record.get("_line"))
            prompts.append(
                {"id": record_id, "turn": number, "expected": list(facts), "messages": record["messages"][:index]}
            )
    return prompts


def evaluate_replies(
    replies: Sequence[str], records: Sequence[dict], n_resamples: int, seed: int, extra_replies: Sequence[str] = ()
) -> dict:
    """One model's metrics: decisions of the final replies, the asking turns, facts asked again.

    Args:
        extra_replies: the replies to `extra_prompts(records)`, in order; empty when they were not generated.

    Returns:
        "decision": `decision_metrics` without "parsed", "decision_ci": `decision_intervals`,
        "outcome_accuracy_ci", "asks_at_decision_rate" over the records with a reference decision
        (the others are left out; no keys when none has one); "asks": `ask_metrics` of the asking
        turns (with `extra_replies`); "asks_again": `asks_again_metrics` (when a record can be scored).

    Raises:
        ValueError: `extra_replies` is not empty and not aligned with `extra_prompts(records)`.
    """
    prompts = extra_prompts(records) if len(extra_replies) else []
    if len(extra_replies) != len(prompts):
        raise ValueError(f"{len(extra_replies)} extra replies for {len(prompts)} extra prompts")
    result = _decision_results(replies, records, n_resamples, seed)
    if prompts:
        result["asks"] = ask_metrics(extra_replies, [p["expected"] for p in prompts], n_resamples, seed)
    again = asks_again_metrics(replies, records, extra_replies, n_resamples, seed)
    return result | ({"asks_again": again} if again else {})


def _decision_results(replies: Sequence[str], records: Sequence[dict], n_resamples: int, seed: int) -> dict:
    """The decision keys of `evaluate_replies` ({} when no record has a reference decision)."""
    references = [reference_decision(r) for r in records]
    scored = [i for i, decision in enumerate(references) if decision is not None]
    if not scored:
        return {}
    replies, references = [replies[i] for i in scored], [references[i] for i in scored]
    decisions = decision_metrics(replies, references, [records[i].get("line_of_business", "all") for i in scored])
    intervals = decision_intervals(
        decisions.pop("parsed"), references, bootstrap_indices(len(scored), n_resamples, seed)
    )
    return {
        "decision": decisions,
        "decision_ci": intervals,
        "outcome_accuracy_ci": intervals["outcome_accuracy"],
        "asks_at_decision_rate": asks_at_decision_rate(replies),
    }


def prediction_fields(record: dict, replies: dict[str, str]) -> dict:
    """predictions.jsonl columns: line of business, reference decision, each model's parsed decision."""
    fields = {
        "line_of_business": record.get("line_of_business", "all"),
        "reference_decision": reference_decision(record),
    }
    return fields | {f"decision_{name}": parse_decision_line(reply) for name, reply in replies.items()}


def report_lines(results: dict, names: list[str]) -> list[str]:
    """report.md: decision and asking-again rows of the main table, asking turns, per line of business, confusions."""
    lines = _decision_rows(results, names) + _asks_again_rows(results, names) + _asking_turn_lines(results, names)
    decision = {n: results[n].get("decision") for n in names}
    if all(decision.values()):
        lines += _line_of_business_lines(decision, names)
        for key, label in [("outcome_confusion", "Outcome"), ("risk_class_confusion", "Risk class")]:
            lines += _confusion_lines(decision, names, key, label)
    return lines


# --- the metrics ---
def rule_citation_f1(predicted: Sequence[Sequence[str] | None], reference: Sequence[Sequence[str]]) -> dict:
    """Micro-averaged {"precision", "recall", "f1", "tp", "fp", "fn"} of cited rule ids (None: cited none).

    A metric with a zero denominator is 0.0.
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

    Returns:
        {"labels": rows, "columns": the labels, predictions outside them, "unparsed"; "matrix"}, where
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
    """Parse rate, outcome and risk-class accuracy (over all n: unparsed = wrong) and rule P/R/F1.

    Returns:
        {"n", "parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_precision",
         "rule_recall", "rule_f1"}, plus "n_approvals" and "condition_accuracy" (None without
        approvals) when `condition_hits` can score conditions; {"n": 0} for no examples.
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
    """Per example, (hit, is reference approval) as two 0.0/1.0 lists.

    A hit is a reference approval whose reply approves and names exactly its conditions (order and
    case ignored). None when a reference has no "conditions" or a parsed decision was not given its
    conditions (`decision_metrics` adds them): nothing to score.
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

    Returns:
        {"overall": `score_decisions`, "by_line_of_business": {lob: dict} (empty without
        `lines_of_business`), "outcome_confusion", "risk_class_confusion": `confusion_matrix` dicts,
        "parsed": each reply's decision with the conditions it names (None where unparsable)}.

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


def decision_intervals(parsed: Sequence[dict | None], reference: Sequence[dict], indices: np.ndarray) -> dict:
    """95% bootstrap intervals of the decision metrics on shared resamples (`bootstrap_indices`).

    Returns:
        {"parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1"} `bootstrap_ratio_ci`
        dicts (rule F1 as the ratio of sums 2TP / (2TP + FP + FN): the micro F1 on every resample),
        and "condition_accuracy" (hits over approvals) where `condition_hits` scores at least one approval.

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
    """Score the asking turns: does each reply ask for exactly the facts still missing there?

    Asked facts are read with `parse_asked_facts`; a DECISION line at an asking turn decides too early.

    Returns:
        {"n_turns", "ask_precision", "ask_recall", "exact_rate", "early_decision_rate", and the same
        four with "_ci" (`bootstrap_ratio_ci` over turns)}; precision and recall are micro-averaged
        over facts. {"n_turns": 0} for no turns.

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
    """Share of final replies that ask for facts instead of deciding (no DECISION line, a fact asked; 0.0 for none)."""
    asking = [parse_decision_line(t) is None and bool(parse_asked_facts(t)) for t in generated]
    return sum(asking) / len(asking) if asking else 0.0


def asks_again_metrics(
    generated: Sequence[str],
    records: Sequence[dict],
    extra_replies: Sequence[str] = (),
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Share of final and asking turns whose reply asks for a fact the conversation already gave (`given_facts`).

    Asked facts are read with `parse_asked_facts`. Records `given_facts` cannot score are left out.
    The interval resamples conversations (asked-again turns over turns, `bootstrap_ratio_ci`).

    Args:
        generated: the final replies, aligned with `records`.
        extra_replies: the replies to `extra_prompts(records)` in order; empty: the final turns only.

    Returns:
        {"n_conversations" (= final turns), "n_asking_turns", "rate", "rate_ci", "final_rate",
        "asking_rate" (None without asking turns)}; {} when no record is scored.
    """
    extras = iter(extra_replies)
    final, asking = [], []  # per scored conversation: asked-again hits of its final turn / of its asking turns
    for reply, record in zip(generated, records):
        ask_replies = [next(extras) for _ in _asking_turns(record)] if len(extra_replies) else []
        given = given_facts(record)
        if given is None:
            continue
        final.append(float(bool(parse_asked_facts(reply) & given[-1])))
        asking.append([float(bool(parse_asked_facts(r) & g)) for r, g in zip(ask_replies, given)])
    if not final:
        return {}
    hits = [f + sum(a) for f, a in zip(final, asking)]
    interval = bootstrap_ratio_ci(
        hits, [1.0 + len(a) for a in asking], indices=bootstrap_indices(len(final), n_resamples, seed)
    )
    n_asking = sum(len(a) for a in asking)
    return {
        "n_conversations": len(final),
        "n_asking_turns": n_asking,
        "rate": interval["mean"],
        "rate_ci": interval,
        "final_rate": sum(final) / len(final),
        "asking_rate": sum(map(sum, asking)) / n_asking if n_asking else None,
    }


# --- report.md ---
def _delta(values: list[float], names: list[str]) -> str | None:
    """The finetuned - base cell when two models are compared (None: no difference column)."""
    return f"{values[-1] - values[0]:+.3f}" if len(names) > 1 else None


def _decision_rows(results: dict, names: list[str]) -> list[str]:
    """Rows of the main table: the decision metrics with their intervals, and re-asking at the decision turn."""
    if "decision" not in results[names[0]]:
        return []
    lines = []
    for label, key in REPORT_DECISION_ROWS:
        values = [results[n]["decision"]["overall"].get(key) for n in names]
        if None in values:  # no condition accuracy: references without conditions, or no approvals
            continue
        intervals = [results[n].get("decision_ci", {}).get(key) for n in names]
        if key == "outcome_accuracy" and not all(intervals):  # metrics.json written before decision_ci existed
            intervals = [results[n]["outcome_accuracy_ci"] for n in names]
        cells = [value_with_interval(v, ci) for v, ci in zip(values, intervals)]
        lines.append(table_row(label, cells, _delta(values, names)))
    if all("asks_at_decision_rate" in results[n] for n in names):
        values = [results[n]["asks_at_decision_rate"] for n in names]
        lines.append(table_row("decision turn asks again instead", [f"{v:.3f}" for v in values], _delta(values, names)))
    return lines


def _asks_again_rows(results: dict, names: list[str]) -> list[str]:
    """The main-table row of `asks_again_metrics`, when every model has it."""
    again = [results[n].get("asks_again") for n in names]
    if not all(again):
        return []
    turns = "final and asking turns" if again[0]["n_asking_turns"] else "final turns"
    values = [a["rate"] for a in again]
    cells = [value_with_interval(a["rate"], a["rate_ci"]) for a in again]
    return [table_row(f"asks again for a given fact ({turns})", cells, _delta(values, names))]


def _asking_turn_lines(results: dict, names: list[str]) -> list[str]:
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
        *table_head("asking-turn metric", names, len(names) > 1),
    ]
    for label, key in REPORT_ASK_ROWS:
        values = [asks[n][key] for n in names]
        cells = [value_with_interval(v, asks[n][f"{key}_ci"]) for v, n in zip(values, names)]
        lines.append(table_row(label, cells, _delta(values, names)))
    return lines


def _line_of_business_lines(decision: dict, names: list[str]) -> list[str]:
    """The decision metrics per line of business, every model's value in one cell ("base / finetuned")."""
    n = decision[names[0]]["overall"]["n"]
    lines = ["", f"## Per line of business ({' / '.join(names)}; {n} replies with a reference decision)", ""]
    lines += [
        "| line of business | n | parse rate | outcome acc. | risk-class acc. | rule F1 |",
        "|---|---|---|---|---|---|",
    ]
    for lob, first in decision[names[0]]["by_line_of_business"].items():
        per = [decision[n]["by_line_of_business"][lob] for n in names]
        keys = ("parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1")
        cells = [" / ".join(f"{p[key]:.3f}" for p in per) for key in keys]
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
