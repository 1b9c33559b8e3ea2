"""Tests of common/decision.py: writing and reading the DECISION line.

python -m pytest -q tests/test_decision.py
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.decision import format_decision_line, parse_decision_line


def test_format_writes_the_documented_line():
    line = format_decision_line("approve", "preferred", ["L-3", "L-7"])
    assert line == "DECISION: approve | CLASS: preferred | RULES: L-3, L-7"
    assert format_decision_line("decline", "n/a", ["H-1"]) == "DECISION: decline | CLASS: n/a | RULES: H-1"


@pytest.mark.parametrize(
    "outcome, risk_class, rules",
    [
        ("accept", "preferred", ["L-1"]),  # unknown outcome
        ("approve", "gold", ["L-1"]),  # unknown class
        ("approve", "n/a", ["L-1"]),  # an approval needs a class
        ("refer", "standard", ["L-1"]),  # a referral has no class
        ("decline", "n/a", []),  # no rules
        ("decline", "n/a", ["L3"]),  # malformed id
    ],
)
def test_format_rejects_bad_input(outcome, risk_class, rules):
    with pytest.raises(ValueError):
        format_decision_line(outcome, risk_class, rules)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "DECISION: approve | CLASS: preferred | RULES: L-10",
            {"outcome": "approve", "risk_class": "preferred", "rules": ["L-10"]},
        ),
        (
            "Refer it. Rules applied: H-3 (old roof).\nDECISION: refer | CLASS: n/a | RULES: H-3, H-8",
            {"outcome": "refer", "risk_class": "n/a", "rules": ["H-3", "H-8"]},
        ),
        (
            "  decision :  Approve|class:SUBSTANDARD |  rules:  b-5 ,  B - 6  ",
            {"outcome": "approve", "risk_class": "substandard", "rules": ["B-5", "B-6"]},
        ),
        (
            "Decline.\nDECISION: decline | CLASS: N/A | RULES: L-1.\n\n   \n",
            {"outcome": "decline", "risk_class": "n/a", "rules": ["L-1"]},
        ),
        (
            # Two decision lines: the last one wins.
            "DECISION: approve | CLASS: standard | RULES: L-8\nOn reflection:\n"
            "DECISION: decline | CLASS: n/a | RULES: L-3",
            {"outcome": "decline", "risk_class": "n/a", "rules": ["L-3"]},
        ),
    ],
)
def test_parse_reads_good_lines(text, expected):
    assert parse_decision_line(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Approve at preferred. L-10 applies.",  # no decision line
        "DECISION: approve | RULES: L-10",  # CLASS missing
        "DECISION: approve | CLASS: preferred",  # RULES missing
        "DECISION: accept | CLASS: preferred | RULES: L-10",  # unknown outcome
        "DECISION: approve | CLASS: gold | RULES: L-10",  # unknown class
        "DECISION: approve | CLASS: preferred | RULES: ",  # empty rules
        "DECISION: approve | CLASS: preferred | RULES: L-10, none",  # malformed rule id
        "The answer is DECISION: approve | CLASS: preferred | RULES: L-10",  # not at line start
    ],
)
def test_parse_returns_none_for_bad_lines(text):
    assert parse_decision_line(text) is None


decisions = st.one_of(
    st.tuples(st.just("approve"), st.sampled_from(["preferred", "standard", "substandard"])),
    st.tuples(st.sampled_from(["refer", "decline"]), st.just("n/a")),
)
rule_lists = st.lists(
    st.builds(lambda letter, number: f"{letter}-{number}", st.sampled_from("LHB"), st.integers(1, 99)),
    min_size=1,
    max_size=6,
)


@given(decision=decisions, rules=rule_lists, preamble=st.text(alphabet="abc .\n", max_size=40))
def test_parse_inverts_format(decision, rules, preamble):
    outcome, risk_class = decision
    reply = preamble + "\n" + format_decision_line(outcome, risk_class, rules) + "\n"
    assert parse_decision_line(reply) == {"outcome": outcome, "risk_class": risk_class, "rules": rules}
