"""common.metrics (generic: perplexity, bootstrap, ROUGE, report.md) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.metrics import (
    bootstrap_indices,
    bootstrap_ratio_ci,
    perplexity,
    perplexity_from_loss_ci,
    render_eval_report,
    rouge_scores,
)
from tests.conftest import eval_metrics


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


def test_render_eval_report_table():
    loss = {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 4}
    result = {
        "loss": loss,
        "perplexity": perplexity_from_loss_ci(loss),
        "rouge": {"rouge1": 0.5, "rouge2": 0.25, "rougeL": 0.5},
    }
    metrics = eval_metrics(result, dict(result, rouge={"rouge1": 0.75, "rouge2": 0.5, "rougeL": 0.625}))
    sample = {"id": "e1", "reference": "r", "generated_base": "b", "generated_finetuned": "f"}
    task_lines = ["| exact answer | 0.250 | 0.500 | +0.250 |", "", "## Task section"]
    lines = render_eval_report(metrics, [sample], task_lines).splitlines()
    assert lines[4:11] == [
        "| metric | base | finetuned | finetuned - base |",
        "|---|---|---|---|",
        "| mean cross-entropy (assistant tokens) | 1 [0.9, 1.1] | 1 [0.9, 1.1] | -0.2 [-0.3, -0.1] |",
        "| perplexity | 2.718 [2.46, 3.004] | 2.718 [2.46, 3.004] | x0.800 |",
        "| ROUGE-1 | 0.500 | 0.750 | +0.250 |",
        "| ROUGE-2 | 0.250 | 0.500 | +0.250 |",
        "| ROUGE-L | 0.500 | 0.625 | +0.125 |",
    ]
    assert lines[11] == task_lines[0]  # the task's leading rows continue the table
    assert "lower than the base's by 0.2000" in lines[13] and "not resampling noise" in lines[13]
    assert lines[14:16] == task_lines[1:] and lines.index("### e1") > 16  # then the task's sections, then samples
    single = render_eval_report(metrics | {"models": {"base": result}, "comparison": None, "adapter": None})
    assert "| perplexity | 2.718 [2.46, 3.004] |\n" in single and "How sure" not in single


def test_interval_widths_are_95_percent_on_known_cases():
    """100 outcomes, 50 right: the 95% half-width is 1.96 * sqrt(0.5 * 0.5 / 100) = 0.098 (a 50% interval
    would be 0.034); tests/test_decision.py checks the decision metrics and asking-turn rates built on it"""
    hits = [1.0, 0.0] * 50
    normal = 1.96 * math.sqrt(0.25 / 100)
    assert bootstrap_ratio_ci(hits, n_resamples=4000, seed=0)["half_width"] == pytest.approx(normal, rel=0.1)
    assert bootstrap_ratio_ci(hits, n_resamples=4000, seed=0, confidence=0.5)["half_width"] == pytest.approx(
        0.674 * math.sqrt(0.25 / 100), rel=0.15
    )
