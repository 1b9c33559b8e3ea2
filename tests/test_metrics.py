"""common.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.metrics import (
    ask_metrics,
    asks_at_decision_rate,
    bootstrap_indices,
    bootstrap_ratio_ci,
    confusion_matrix,
    decision_intervals,
    decision_metrics,
    perplexity,
    perplexity_from_loss_ci,
    render_eval_report,
    rouge_scores,
    rule_citation_f1,
    score_decisions,
    score_samples,
)


def test_perplexity_of_uniform_distribution_is_vocab_size():
    # A model that puts 1/V on every token has cross-entropy log(V) per token, perplexity V.
    vocab, tokens = 50, 7
    logits = torch.zeros(tokens, vocab)
    targets = torch.randint(0, vocab, (tokens,))
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    assert perplexity(loss_sum, tokens) == pytest.approx(vocab, rel=1e-6)


def test_perplexity_of_known_distribution():
    # p(target) = 1/2, 1/4, 1/8 -> mean NLL = (1+2+3)/3 * ln 2 -> ppl = 2**2 = 4
    loss_sum = -(math.log(1 / 2) + math.log(1 / 4) + math.log(1 / 8))
    assert perplexity(loss_sum, 3) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_bootstrap_ratio_is_ratio_of_sums_and_contains_mean():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 50, size=200).astype(float)
    sums = counts * rng.normal(2.0, 0.3, size=200)
    ci = bootstrap_ratio_ci(sums, counts, n_resamples=500, seed=1)
    assert ci["mean"] == pytest.approx(sums.sum() / counts.sum())  # weighted by tokens, not per-example means
    assert ci["low"] < ci["mean"] < ci["high"]
    assert ci["half_width"] == pytest.approx((ci["high"] - ci["low"]) / 2)
    assert ci["half_width"] < 0.1 and ci["n"] == 200 and ci["resamples"] == 500
    # reproducible with the same seed
    assert bootstrap_ratio_ci(sums, counts, n_resamples=500, seed=1) == ci


def test_bootstrap_plain_mean_and_constant_data():
    values = [0.0, 1.0] * 50
    ci = bootstrap_ratio_ci(values, n_resamples=300)
    assert ci["mean"] == 0.5 and ci["low"] < 0.5 < ci["high"]
    constant = bootstrap_ratio_ci([3.0] * 10, n_resamples=50)
    assert constant["low"] == constant["mean"] == constant["high"] == 3.0
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1.0, 2.0], [1.0])


def test_paired_bootstrap_with_shared_indices():
    counts = np.full(30, 10.0)
    base = np.linspace(20, 40, 30)
    tuned = base - 5.0  # better by exactly 0.5 nats/token on every example
    indices = bootstrap_indices(30, 200, seed=0)
    delta = bootstrap_ratio_ci(tuned - base, counts, indices=indices)
    assert delta["mean"] == pytest.approx(-0.5) and delta["low"] == pytest.approx(-0.5)
    assert delta["high"] == pytest.approx(-0.5)
    ppl = perplexity_from_loss_ci({"mean": 1.0, "low": 0.5, "high": 2.0})
    assert ppl == pytest.approx({"value": math.e, "low": math.exp(0.5), "high": math.exp(2.0)})


def test_rouge_of_known_strings():
    assert rouge_scores(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    )
    # prediction "the cat" vs reference "the cat sat down": unigram P=2/2, R=2/4 -> F=2/3;
    # bigrams: "the cat" 1 of 1 vs 1 of 3 -> F=0.5; LCS 2 -> same as ROUGE-1
    scores = rouge_scores(["the cat"], ["the cat sat down"])
    assert scores == pytest.approx({"rouge1": 2 / 3, "rouge2": 0.5, "rougeL": 2 / 3})
    assert rouge_scores(["dogs"], ["dog"])["rouge1"] == 1.0  # stemming
    assert rouge_scores(["a b", "x"], ["a b", "y"])["rouge1"] == pytest.approx(0.5)  # mean over examples
    assert rouge_scores([], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rule_f1_is_micro_averaged():
    # ex1: cites L-1, L-2 vs truth L-1 -> tp1 fp1; ex2: cites nothing (unparsed) vs truth H-3, H-4 -> fn2
    result = rule_citation_f1([["L-1", "L-2"], None], [["L-1"], ["H-3", "H-4"]])
    assert (result["tp"], result["fp"], result["fn"]) == (1, 1, 2)
    assert result["precision"] == pytest.approx(0.5) and result["recall"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert rule_citation_f1([None], [["L-1"]])["f1"] == 0.0


def test_confusion_matrix_with_unparsed_column():
    matrix = confusion_matrix(
        ["approve", "refer", "refer", "decline"],
        ["approve", None, "decline", "decline"],
        ["approve", "refer", "decline"],
    )
    assert matrix["columns"] == ["approve", "refer", "decline", "unparsed"]
    assert matrix["matrix"] == [[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0]]


GOOD = "Rule L-3 applies.\nDECISION: approve | CLASS: standard | RULES: L-3"
REFERENCES = [
    {"outcome": "approve", "risk_class": "standard", "rules": ["L-3"]},
    {"outcome": "refer", "risk_class": "n/a", "rules": ["H-2"]},
    {"outcome": "decline", "risk_class": "n/a", "rules": ["B-1", "B-4"]},
    {"outcome": "decline", "risk_class": "n/a", "rules": ["L-9"]},
]
REPLIES = [
    GOOD,  # all right
    "decision: Refer | class: N/A | rules: h-2, h-5.",  # lenient format: right outcome/class, one extra rule
    "I would decline this one.",  # no decision line: unparsed
    "DECISION: approve | CLASS: preferred | RULES: L-9",  # wrong outcome and class, right rule
]


def test_decision_parser_good_and_bad_lines():
    parsed = decision_metrics(REPLIES, REFERENCES)["parsed"]
    assert parsed[0] == {"outcome": "approve", "risk_class": "standard", "rules": ["L-3"], "conditions": []}
    assert parsed[1] == {"outcome": "refer", "risk_class": "n/a", "rules": ["H-2", "H-5"], "conditions": []}
    assert parsed[2] is None
    assert decision_metrics(["DECISION: maybe | CLASS: standard | RULES: L-1"], REFERENCES[:1])["parsed"] == [None]
    assert decision_metrics(["DECISION: approve | CLASS: standard | RULES:"], REFERENCES[:1])["parsed"] == [None]


def test_decision_metrics_overall_and_by_line_of_business():
    lobs = ["term_life", "homeowners", "small_business_property", "term_life"]
    result = decision_metrics(REPLIES, REFERENCES, lobs)
    overall = result["overall"]
    assert overall["n"] == 4 and overall["parse_rate"] == 0.75
    assert overall["outcome_accuracy"] == 0.5 and overall["risk_class_accuracy"] == 0.5
    # rules: tp = L-3, H-2, L-9 = 3; fp = H-5 = 1; fn = B-1, B-4 = 2
    assert overall["rule_precision"] == pytest.approx(3 / 4) and overall["rule_recall"] == pytest.approx(3 / 5)
    assert result["by_line_of_business"]["term_life"]["outcome_accuracy"] == 0.5
    assert result["by_line_of_business"]["small_business_property"]["parse_rate"] == 0.0
    assert result["by_line_of_business"]["homeowners"]["risk_class_accuracy"] == 1.0
    outcome = result["outcome_confusion"]
    assert outcome["matrix"][outcome["labels"].index("decline")] == [1, 0, 0, 1]  # one approve, one unparsed
    assert score_decisions([], []) == {"n": 0}


def test_condition_accuracy_over_reference_approvals():
    inspect, rider = "roof inspection within 30 days", "hazardous-activity exclusion rider"
    reference = [
        {"outcome": "approve", "risk_class": "standard", "rules": ["H-7"], "conditions": [inspect]},
        {"outcome": "approve", "risk_class": "substandard", "rules": ["L-7"], "conditions": [rider]},
        {"outcome": "approve", "risk_class": "preferred", "rules": ["L-10"], "conditions": []},
        {"outcome": "approve", "risk_class": "standard", "rules": ["H-7"], "conditions": [inspect]},
        {"outcome": "refer", "risk_class": "n/a", "rules": ["H-3"], "conditions": []},
    ]
    replies = [
        "Approve at standard. Condition: Roof inspection within 30 days.\nDECISION: approve | CLASS: standard | RULES: H-7",
        "Approved. Condition: roof inspection within 30 days.\nDECISION: approve | CLASS: substandard | RULES: L-7",
        "Approve at preferred. Subject to: 5% named-storm deductible.\nDECISION: approve | CLASS: preferred | RULES: L-10",
        "Refer.\nDECISION: refer | CLASS: n/a | RULES: H-7",  # no approval: the conditions cannot be right
        "Refer. Condition: none of these count.\nDECISION: refer | CLASS: n/a | RULES: H-3",  # not an approval
    ]
    result = decision_metrics(replies, reference)
    assert result["parsed"][0]["conditions"] == [inspect]  # case ignored
    assert result["parsed"][2]["conditions"] == ["5% named-storm deductible"]
    overall = result["overall"]
    assert overall["n_approvals"] == 4
    assert overall["condition_accuracy"] == pytest.approx(1 / 4)  # only the first: wrong, extra, not approved
    intervals = decision_intervals(result["parsed"], reference, bootstrap_indices(5, 300, seed=2))
    assert intervals["condition_accuracy"]["mean"] == pytest.approx(1 / 4)
    assert intervals["condition_accuracy"]["low"] < intervals["condition_accuracy"]["high"]
    # References without conditions (bring-your-own data) leave the metric out instead of scoring 0.
    no_conditions = [{"outcome": "approve", "risk_class": "standard", "rules": ["H-7"]}]
    plain = decision_metrics(replies[:1], no_conditions)
    assert "condition_accuracy" not in plain["overall"]
    assert "condition_accuracy" not in decision_intervals(plain["parsed"], no_conditions, bootstrap_indices(1, 10))
    assert "condition_accuracy" not in score_decisions(no_conditions, reference[:1])  # parsed without conditions
    assert score_decisions([None], reference[:1])["condition_accuracy"] == 0.0  # unparsed: wrong
    refer_only = decision_metrics(replies[4:], reference[4:])
    assert refer_only["overall"]["n_approvals"] == 0 and refer_only["overall"]["condition_accuracy"] is None


def test_render_eval_report_table():
    loss = {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 4}
    result = {
        "loss": loss,
        "perplexity": perplexity_from_loss_ci(loss),
        "rouge": {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.5},
        "decision": {k: v for k, v in decision_metrics(REPLIES, REFERENCES, ["a"] * 4).items() if k != "parsed"},
        "outcome_accuracy_ci": {"low": 0.0, "high": 1.0},
    }
    metrics = {
        "adapter": "runs/x/best",
        "model": "tiny",
        "data_file": "t.jsonl",
        "examples": 4,
        "loss_examples": 4,
        "generation_examples": 4,
        "decision_examples": 4,
        "settings": {"max_new_tokens": 8, "dtype": "float32", "bootstrap": 10},
        "models": {"base": result, "finetuned": result},
        "comparison": {
            "loss_delta": {"mean": -0.2, "low": -0.3, "high": -0.1, "n": 4},
            "perplexity_ratio": 0.8,
            "significant": True,
        },
    }
    report = render_eval_report(
        metrics,
        [{"id": "e1", "line_of_business": "a", "reference": "r", "generated_base": "b", "generated_finetuned": "f"}],
    )
    assert "| mean cross-entropy (assistant tokens) | 1 [0.9, 1.1] | 1 [0.9, 1.1] | -0.2 [-0.3, -0.1] |" in report
    assert "| outcome accuracy | 0.500 [0.000, 1.000] |" in report
    assert "| a | 4 | 0.750 / 0.750 |" in report
    assert "| decline | 1 / 1 | 0 / 0 | 0 / 0 | 1 / 1 |" in report
    assert "lower than the base's by 0.2000" in report and "not resampling noise" in report


def test_ask_metrics_precision_recall_exact_and_early():
    replies = [
        "Thanks. I still need the BMI and smoking status.",  # exactly right
        "Got it. And the BMI?",  # misses smoking status
        "Please send the BMI, the occupation and the face amount.",  # one right, two not missing
        "Facts: ...\nDECISION: approve | CLASS: preferred | RULES: L-10",  # decided too early
    ]
    expected = [["bmi", "smoker"], ["bmi", "smoker"], ["bmi"], ["occupation"]]
    result = ask_metrics(replies, expected, n_resamples=200)
    assert result["n_turns"] == 4
    assert result["ask_precision"] == pytest.approx((2 + 1 + 1) / (2 + 1 + 3))
    assert result["ask_recall"] == pytest.approx((2 + 1 + 1) / (2 + 2 + 1 + 1))
    assert result["exact_rate"] == 0.25 and result["early_decision_rate"] == 0.25
    ci = result["ask_recall_ci"]
    assert ci["low"] <= result["ask_recall"] <= ci["high"]
    assert ask_metrics([], []) == {"n_turns": 0}
    with pytest.raises(ValueError):
        ask_metrics(["x"], [])


def test_asks_at_decision_rate_and_sample_scores():
    final = ["I still need the BMI.", "DECISION: refer | CLASS: n/a | RULES: L-4", "Sorry, I cannot help."]
    assert asks_at_decision_rate(final) == pytest.approx(1 / 3)
    reference = [{"outcome": "refer"}, {"outcome": "approve"}, None]
    scores = score_samples(final, reference)
    assert scores == {"sample_n": 2, "sample_parse_rate": 0.5, "sample_outcome_accuracy": 0.0}
    assert score_samples(final, [None] * 3)["sample_parse_rate"] is None


def test_decision_intervals_match_the_point_metrics():
    reference = [{"outcome": "approve", "risk_class": "standard", "rules": ["L-8"]}] * 6
    parsed = [{"outcome": "approve", "risk_class": "standard", "rules": ["L-8"]}] * 3
    parsed += [{"outcome": "approve", "risk_class": "preferred", "rules": ["L-8", "L-6"]}, None, None]
    intervals = decision_intervals(parsed, reference, bootstrap_indices(6, 300, seed=1))
    point = score_decisions(parsed, reference)
    for key in ("parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1"):
        assert intervals[key]["mean"] == pytest.approx(point[key]), key
        assert intervals[key]["low"] <= point[key] <= intervals[key]["high"], key
    assert intervals["parse_rate"]["low"] < intervals["parse_rate"]["high"]  # it varies across resamples


def test_interval_widths_are_95_percent_on_known_cases():
    """100 outcomes, 50 right: the 95% half-width is 1.96 * sqrt(0.5 * 0.5 / 100) = 0.098 (a 50% interval
    would be 0.034); the same for the decision metrics and the asking-turn rates built on it"""
    hits = [1.0, 0.0] * 50
    normal = 1.96 * math.sqrt(0.25 / 100)
    assert bootstrap_ratio_ci(hits, n_resamples=4000, seed=0)["half_width"] == pytest.approx(normal, rel=0.1)
    assert bootstrap_ratio_ci(hits, n_resamples=4000, seed=0, confidence=0.5)["half_width"] == pytest.approx(
        0.674 * math.sqrt(0.25 / 100), rel=0.15
    )
    reference = [{"outcome": "approve", "risk_class": "standard", "rules": ["L-8"]}] * 100
    wrong = {"outcome": "decline", "risk_class": "n/a", "rules": ["L-8"]}
    parsed = [reference[0], wrong] * 50
    intervals = decision_intervals(parsed, reference, bootstrap_indices(100, 4000, seed=0))
    assert intervals["outcome_accuracy"]["mean"] == 0.5
    assert intervals["outcome_accuracy"]["half_width"] == pytest.approx(normal, rel=0.1)
    assert intervals["risk_class_accuracy"]["half_width"] == pytest.approx(normal, rel=0.1)
    asks = ask_metrics(["What is the BMI?", "Thanks."] * 50, [["bmi"]] * 100, n_resamples=4000)
    assert asks["exact_rate"] == 0.5 and asks["exact_rate_ci"]["half_width"] == pytest.approx(normal, rel=0.1)
