"""The underwriting task module (data/task.py): the DECISION line, decision and asking-turn metrics, report rows.

python -m pytest -q tests/test_decision.py
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.metrics import bootstrap_indices, bootstrap_ratio_ci, perplexity_from_loss_ci, render_eval_report
from data.task import (
    FACT_ASK_NAMES,
    ask_metrics,
    asks_again_metrics,
    asks_at_decision_rate,
    confusion_matrix,
    decision_intervals,
    decision_metrics,
    evaluate_replies,
    extra_prompts,
    format_decision_line,
    given_facts,
    parse_decision_line,
    prediction_fields,
    report_lines,
    rule_citation_f1,
    score_decisions,
    score_reply,
)
from tests.conftest import eval_metrics

BEFORE = json.loads((Path(__file__).parent / "task_metrics_before.json").read_text())


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


def test_asks_at_decision_rate_and_score_reply():
    final = ["I still need the BMI.", "DECISION: refer | CLASS: n/a | RULES: L-4", "Sorry, I cannot help."]
    assert asks_at_decision_rate(final) == pytest.approx(1 / 3)
    assert score_reply(final[0], {"decision": {"outcome": "refer"}}) == {"parse_rate": 0.0, "outcome_accuracy": 0.0}
    assert score_reply(final[1], {"decision": {"outcome": "refer"}}) == {"parse_rate": 1.0, "outcome_accuracy": 1.0}
    assert score_reply(final[1], {"decision": {"outcome": "approve"}}) == {"parse_rate": 1.0, "outcome_accuracy": 0.0}
    assert score_reply(final[2], {"messages": []}) is None  # no reference decision: nothing to score


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
    """100 outcomes, 50 right: the 95% half-width is 1.96 * sqrt(0.5 * 0.5 / 100) = 0.098, for the
    decision metrics and the asking-turn rates as for the plain mean"""
    normal = 1.96 * math.sqrt(0.25 / 100)
    assert bootstrap_ratio_ci([1.0, 0.0] * 50, n_resamples=4000, seed=0)["half_width"] == pytest.approx(normal, rel=0.1)
    reference = [{"outcome": "approve", "risk_class": "standard", "rules": ["L-8"]}] * 100
    wrong = {"outcome": "decline", "risk_class": "n/a", "rules": ["L-8"]}
    parsed = [reference[0], wrong] * 50
    intervals = decision_intervals(parsed, reference, bootstrap_indices(100, 4000, seed=0))
    assert intervals["outcome_accuracy"]["mean"] == 0.5
    assert intervals["outcome_accuracy"]["half_width"] == pytest.approx(normal, rel=0.1)
    assert intervals["risk_class_accuracy"]["half_width"] == pytest.approx(normal, rel=0.1)
    asks = ask_metrics(["What is the BMI?", "Thanks."] * 50, [["bmi"]] * 100, n_resamples=4000)
    assert asks["exact_rate"] == 0.5 and asks["exact_rate_ci"]["half_width"] == pytest.approx(normal, rel=0.1)


# --- the task interface on synthetic records, against the numbers the code before data/task.py gave ---
ASK_NAMES = {
    "age": "the applicant's age",
    "bmi": "the BMI",
    "smoker": "smoking status",
    "occupation": "the occupation",
    "roof_age": "the roof age",
    "wind_zone": "the wind zone",
    "tiv": "the total insured value",
    "prior_losses": "the 5-year loss count",
}
CONDITIONS = ["roof inspection within 30 days", "hazardous-activity exclusion rider", "5% named-storm deductible"]


def known_cases(n: int = 48, seed: int = 28, fallback: bool = True) -> tuple[list[dict], list[str], dict]:
    """Seeded records (3 lines of business, approvals with conditions, 0-2 asking turns) and replies of 7 kinds.

    With `fallback`, every 11th record has no stored decision (its reference is parsed from the
    reply, without conditions), one has none at all, and one has no line of business.

    Returns:
        (records, final replies, {(record id, turn): asking-turn reply}).
    """
    rng = random.Random(seed)
    records, replies, ask_replies = [], [], {}
    for i in range(n):
        lob = ["term_life", "homeowners", "small_business_property"][i % 3]
        outcome = rng.choice(["approve", "refer", "decline"])
        risk_class = rng.choice(["preferred", "standard", "substandard"]) if outcome == "approve" else "n/a"
        rules = [f"{lob[0].upper()}-{k}" for k in sorted(rng.sample(range(1, 11), rng.randint(1, 3)))]
        conditions = rng.sample(CONDITIONS, rng.randint(0, 2)) if outcome == "approve" else []
        sentence = f"{outcome.capitalize()}." + (f" Condition: {'; '.join(conditions)}." if conditions else "")
        reference = f"Facts: case {i}.\n{sentence}\n{format_decision_line(outcome, risk_class, rules)}"
        asks = [rng.sample(list(ASK_NAMES), rng.randint(1, 2)) for _ in range(rng.randint(0, 2))]
        messages = [{"role": "system", "content": "You are an underwriting assistant."}]
        messages.append({"role": "user", "content": f"Case {i}."})
        for turn, facts in enumerate(asks, start=1):
            ask = "I need " + " and ".join(ASK_NAMES[f] for f in facts) + "."
            messages.append({"role": "assistant", "content": ask})
            messages.append({"role": "user", "content": f"Answer {turn}."})
            other = ASK_NAMES[rng.choice(list(ASK_NAMES))] if (kind := rng.randrange(5)) in (1, 4) else ""
            ask_replies[(f"case-{i:03d}", turn)] = [
                ask,  # exactly right
                f"Please send {ASK_NAMES[facts[0]]} and {other}.",  # the first, and one at random
                format_decision_line("approve", "standard", [rules[0]]),  # decides too early
                "Thanks.",  # asks nothing
                f"Got it. And {other}?",  # one at random
            ][kind]
        messages.append({"role": "assistant", "content": reference})
        decision = {"outcome": outcome, "risk_class": risk_class, "rules": rules, "conditions": conditions}
        record = {"id": f"case-{i:03d}", "line_of_business": lob, "messages": messages, "decision": decision}
        if asks:
            record["ask_facts"] = asks
        if fallback and (i % 11 == 10 or i == 21):
            del record["decision"]
        if fallback and i == 21:
            messages[-1]["content"] = "Refer to a senior underwriter."  # no decision line either
        if i == 33:
            del record["line_of_business"]
        records.append(record)
        kind, reply = i % 7, reference  # kind 0: the reference itself
        if kind == 1:  # the wrong outcome
            other = rng.choice([o for o in ("approve", "refer", "decline") if o != outcome])
            reply = f"{other}.\n" + format_decision_line(other, "standard" if other == "approve" else "n/a", rules)
        elif kind == 2:
            reply = "I still need the BMI and smoking status."  # asks instead of deciding
        elif kind == 3:  # lenient format, one extra rule
            cited = ", ".join(r.lower() for r in [*rules, f"{lob[0]}-{rng.randint(11, 14)}"])
            reply = f"{sentence}\ndecision : {outcome.upper()}|class: {risk_class.upper()}|rules: {cited}."
        elif kind == 4:  # right outcome and class, the first rule only
            reply = f"{outcome.capitalize()}.\n" + format_decision_line(outcome, risk_class, rules[:1])
        elif kind == 5:
            reply = "Sorry, I cannot help with that."
        elif kind == 6:  # approves with one condition, cites the last rule
            line = format_decision_line("approve", "preferred", rules[-1:])
            reply = f"{sentence} Subject to: {rng.choice(CONDITIONS)}.\n{line}"
        replies.append(reply)
    return records, replies, ask_replies


@pytest.mark.parametrize("fallback", [True, False], ids=["fallback", "stored"])
def test_task_metrics_equal_those_before_the_task_module(fallback):
    """evaluate_replies gives exactly the dicts evaluate.py computed before (the decision metrics of
    common/metrics.py on evaluate.py's reference decisions, ask_metrics on its asking turns); the records
    carry no `facts`, so nothing is scored for asking again"""
    records, replies, ask_replies = known_cases(fallback=fallback)
    extra = [ask_replies[p["id"], p["turn"]] for p in extra_prompts(records)]
    result = evaluate_replies(replies, records, 300, 7, extra_replies=extra)
    assert result == BEFORE["known_cases"]["fallback" if fallback else "stored"]
    assert result["decision"]["overall"]["n"] == (47 if fallback else 48) and result["asks"]["n_turns"] == 42
    assert ("condition_accuracy" in result["decision"]["overall"]) == (not fallback)


def test_extra_prompts_and_prediction_fields():
    records, replies, _ = known_cases(n=12)
    prompts = extra_prompts(records)
    turns = {r["id"]: len(r.get("ask_facts", [])) for r in records}
    assert [(p["id"], p["turn"]) for p in prompts] == [(i, t) for i, n in turns.items() for t in range(1, n + 1)]
    for prompt in prompts:  # the conversation up to the asking turn, which asks for exactly the expected facts
        record = next(r for r in records if r["id"] == prompt["id"])
        asked = record["messages"][len(prompt["messages"])]
        assert asked["role"] == "assistant" and prompt["messages"][-1]["role"] == "user"
        assert prompt["expected"] == record["ask_facts"][prompt["turn"] - 1]
    fields = prediction_fields(records[10], {"base": replies[0], "finetuned": "no decision"})
    assert fields["reference_decision"] == parse_decision_line(records[10]["messages"][-1]["content"])  # no stored one
    assert fields["decision_base"] == parse_decision_line(replies[0]) and fields["decision_finetuned"] is None
    assert fields["line_of_business"] == records[10]["line_of_business"]


def test_report_lines_continue_the_main_table():
    loss = {"mean": 1.0, "low": 0.9, "high": 1.1, "n": 4}
    task = {k: v for k, v in decision_metrics(REPLIES, REFERENCES, ["a"] * 4).items() if k != "parsed"}
    result = {"loss": loss, "perplexity": perplexity_from_loss_ci(loss), "decision": task}
    result["outcome_accuracy_ci"] = {"low": 0.0, "high": 1.0}  # a metrics.json from before decision_ci
    metrics = eval_metrics(result, result)
    lines = report_lines(metrics["models"], ["base", "finetuned"])
    assert lines[1] == "| outcome accuracy | 0.500 [0.000, 1.000] | 0.500 [0.000, 1.000] | +0.000 |"
    report = render_eval_report(metrics, (), lines).splitlines()
    table = report.index("| perplexity | 2.718 [2.46, 3.004] | 2.718 [2.46, 3.004] | x0.800 |")
    assert report[table + 1 : table + 7] == lines[:6]  # the decision rows continue the main table
    assert report.index("| a | 4 | 0.750 / 0.750 | 0.500 / 0.500 | 0.500 / 0.500 | 0.667 / 0.667 |") > table
    assert "| decline | 1 / 1 | 0 / 0 | 0 / 0 | 1 / 1 |" in report
    single = report_lines({"finetuned": result}, ["finetuned"])
    assert single[1] == "| outcome accuracy | 0.500 [0.000, 1.000] |"  # no difference column


# --- asking again for a fact the conversation already gave ---
def conversation(lob: str, facts: dict, asks: list[list[str]], n_asking: int | None = None) -> dict:
    """A record with `facts`, `ask_facts` and `n_asking` asking turns (default: one per `ask_facts` entry)."""
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "submission"}]
    for turn in range(len(asks) if n_asking is None else n_asking):
        messages += [{"role": "assistant", "content": f"ask {turn}"}, {"role": "user", "content": "answer"}]
    messages.append({"role": "assistant", "content": "DECISION: refer | CLASS: n/a | RULES: L-1"})
    return {"line_of_business": lob, "facts": facts, "ask_facts": asks, "messages": messages}


LIFE = dict.fromkeys(["age", "face_amount", "bmi", "smoker", "medical_history", "occupation"], 1)
HOME = dict.fromkeys(["construction", "roof_age", "fire_station_miles", "hydrant_feet", "prior_claims"], 1)
HOME |= dict.fromkeys(["wind_zone", "dwelling_value"], 1)
BUSINESS = dict.fromkeys(["occupancy", "sprinklered", "building_age", "wiring_updated", "tiv", "prior_losses"], 1)
AGAIN_RECORDS = [
    conversation("term_life", LIFE, [["bmi", "occupation"], ["occupation"]]),  # A: 2 asking turns
    conversation("homeowners", HOME, [["roof_age"]]),  # B: 1 asking turn
    conversation("term_life", LIFE, [["bmi"]]) | {"facts": None},  # C: no facts: not scored
    conversation("term_life", LIFE, [["bmi"]], n_asking=2),  # D: an asking turn without ask_facts: not scored
    conversation("small_business_property", BUSINESS, []),  # E: decided at once
]
AGAIN_FINAL = [
    "Facts: ...\nDECISION: approve | CLASS: standard | RULES: L-1\nCould you confirm smoking status?",  # A: again
    "DECISION: refer | CLASS: n/a | RULES: H-2",  # B: asks nothing
    "I still need the applicant's age.",  # C (not scored)
    "I still need the BMI.",  # D (not scored)
    "Before I decide: the 5-year loss count?",  # E: given in the submission: again
]
AGAIN_ASKING = [
    "I need the BMI and the occupation.",  # A turn 1: exactly the missing facts
    "Thanks. And the BMI and the occupation?",  # A turn 2: the BMI came in the answer to turn 1: again
    "Please send the roof age and the building age.",  # B: the building age is no homeowners fact: not again
    "What is the applicant's age?",  # C (not scored)
    "What is the BMI?",  # D's one prompt (not scored)
]


def test_given_facts_follow_the_ask_facts():
    given = given_facts(AGAIN_RECORDS[0])
    assert given == [set(LIFE) - {"bmi", "occupation"}, set(LIFE) - {"occupation"}, set(LIFE)]
    assert given_facts(AGAIN_RECORDS[4]) == [set(BUSINESS)]
    assert given_facts(AGAIN_RECORDS[2]) is None and given_facts(AGAIN_RECORDS[3]) is None
    assert given_facts({"facts": LIFE, "messages": AGAIN_RECORDS[0]["messages"]}) is None  # no ask_facts


def test_asks_again_counts_replies_that_ask_for_a_given_fact():
    """Scored A, B, E: A's final (a decision that also asks) and second asking turn, E's final: 3 of 6 turns"""
    assert len(extra_prompts(AGAIN_RECORDS)) == len(AGAIN_ASKING)
    result = asks_again_metrics(AGAIN_FINAL, AGAIN_RECORDS, AGAIN_ASKING, n_resamples=300)
    assert {k: v for k, v in result.items() if k != "rate_ci"} == {
        "n_conversations": 3,
        "n_asking_turns": 3,
        "rate": 0.5,
        "final_rate": pytest.approx(2 / 3),
        "asking_rate": pytest.approx(1 / 3),
    }
    ci = result["rate_ci"]
    assert ci["n"] == 3 and ci["low"] <= 0.5 <= ci["high"] and ci["low"] < ci["high"]  # resamples conversations
    final_only = asks_again_metrics(AGAIN_FINAL, AGAIN_RECORDS, n_resamples=300)
    assert final_only["rate"] == pytest.approx(2 / 3) and final_only["n_asking_turns"] == 0
    assert final_only["asking_rate"] is None
    assert asks_again_metrics(AGAIN_FINAL[2:4], AGAIN_RECORDS[2:4], AGAIN_ASKING[3:]) == {}  # nothing to score
    merged = evaluate_replies(AGAIN_FINAL, AGAIN_RECORDS, 300, 0, extra_replies=AGAIN_ASKING)
    assert merged["asks_again"] == asks_again_metrics(AGAIN_FINAL, AGAIN_RECORDS, AGAIN_ASKING, 300, 0)
    assert merged["asks"]["n_turns"] == 5
    with pytest.raises(ValueError, match="4 extra replies for 5 extra prompts"):
        evaluate_replies(AGAIN_FINAL, AGAIN_RECORDS, 300, 0, extra_replies=AGAIN_ASKING[:4])


@pytest.mark.parametrize("split", ["stress", "test"])
def test_reference_turns_never_ask_again(split):
    """On the dataset's own turns every conversation is scored; the references ask again nowhere, a reply
    naming every fact everywhere (each conversation's first turn gives at least two facts)"""
    records = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / f"{split}.jsonl").open()]
    assistant = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in records]
    final, asking = [turns[-1] for turns in assistant], [t for turns in assistant for t in turns[:-1]]
    result = asks_again_metrics(final, records, asking, n_resamples=50)
    assert result["n_conversations"] == len(records)
    assert result["n_asking_turns"] == sum(len(r["ask_facts"]) for r in records) == len(extra_prompts(records))
    assert result["rate"] == 0.0
    everything = "Please send " + ", ".join(FACT_ASK_NAMES.values()) + "."
    assert asks_again_metrics([everything] * len(final), records, [everything] * len(asking), 50)["rate"] == 1.0


def test_report_row_of_asking_again():
    results = {
        name: {"asks_again": asks_again_metrics(final, AGAIN_RECORDS, AGAIN_ASKING, n_resamples=300)}
        for name, final in [("base", ["Thanks."] * 5), ("finetuned", AGAIN_FINAL)]
    }
    lines = report_lines(results, ["base", "finetuned"])
    base, tuned = results["base"]["asks_again"], results["finetuned"]["asks_again"]
    assert base["rate"] == pytest.approx(1 / 6)  # A's second asking turn only
    low, high = tuned["rate_ci"]["low"], tuned["rate_ci"]["high"]
    assert lines[0].startswith("| asks again for a given fact (final and asking turns) | 0.167 [")
    assert lines[0].endswith(f"| 0.500 [{low:.3f}, {high:.3f}] | +0.333 |")
    assert report_lines({"base": results["base"], "finetuned": {}}, ["base", "finetuned"]) == []
