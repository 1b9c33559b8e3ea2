"""Tests of the hand-written stress split (data/stress.jsonl): references, asks, styles, disjointness.

python -m pytest -q tests/test_stress.py
"""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from data import generate, rulebook
from data.task import FACT_ASK_NAMES, parse_asked_facts, parse_conditions, parse_decision_line

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
STRESS_FILE = DATA_DIR / "stress.jsonl"
GENERATED_SPLITS = ("train", "validation", "test")
# How the Facts line writes an age fact the broker gave as a year (see generate.AGE_LABELS).
YEAR_FACT = {"age": re.compile(r"^Facts: born \d{4};"), "roof_age": re.compile(r"; roof built \d{4};")}
YEAR_FACT["building_age"] = re.compile(r"; built \d{4};")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return read_jsonl(STRESS_FILE)


def user_texts(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def year_keys_of(reply: str) -> set[str]:
    """The age facts the reference worksheet keeps as a year, read from its Facts line."""
    facts_line = reply.splitlines()[0]
    return {key for key, pattern in YEAR_FACT.items() if pattern.search(facts_line)}


def test_size_ids_and_lines_of_business(records):
    assert len({r["id"] for r in records}) == len(records)
    counts = Counter(r["line_of_business"] for r in records)
    assert set(counts) == set(rulebook.LINES_OF_BUSINESS)
    assert min(counts.values()) >= 15, counts


def test_reference_decision_is_rederived_from_the_recorded_facts(records):
    for record in records:
        lob, facts = record["line_of_business"], record["facts"]
        assert set(facts) == set(rulebook.REQUIRED_FACTS[lob]), record["id"]
        assert rulebook.decide(lob, facts) == record["decision"], record["id"]
        assert record["profile_id"] == generate.build_profile_id(lob, facts), record["id"]


def test_reference_reply_decision_line_and_conditions_agree(records):
    for record in records:
        reply, decision = record["messages"][-1]["content"], record["decision"]
        parsed = parse_decision_line(reply)
        assert parsed == {k: decision[k] for k in ("outcome", "risk_class", "rules")}, record["id"]
        assert parse_conditions(reply) == decision["conditions"], record["id"]
        assert reply.splitlines()[-1].startswith("DECISION: "), record["id"]


def test_reference_reply_is_the_generators_worksheet(records):
    """Same worksheet as data/*.jsonl, so stress and test scores compare (data/README.md says how to refresh)."""
    for record in records:
        lob, facts, reply = record["line_of_business"], record["facts"], record["messages"][-1]["content"]
        years = year_keys_of(reply)
        expected = [generate.worksheet_facts(lob, facts, years), *generate.worksheet_checks(lob, facts, years)]
        assert reply.splitlines()[:-2] == expected, f"{record['id']}: stale worksheet"
        outcome_sentence = reply.splitlines()[-2]
        templates = generate.OUTCOME_SENTENCES[record["decision"]["outcome"]]
        assert any(
            outcome_sentence.startswith(t.format(risk_class=record["decision"]["risk_class"])) for t in templates
        )


def test_turns_alternate_and_asking_turns_ask_for_the_missing_facts(records):
    for record in records:
        messages, lob = record["messages"], record["line_of_business"]
        roles = [m["role"] for m in messages]
        assert roles[0] == "system" and messages[0]["content"] in generate.SYSTEM_PROMPTS
        assert roles[1:] == ["user", "assistant"] * ((len(roles) - 1) // 2), record["id"]
        asking_turns = [m["content"] for m in messages[2:-1] if m["role"] == "assistant"]
        assert len(asking_turns) == len(record["ask_facts"]), record["id"]
        still_missing = set(rulebook.REQUIRED_FACTS[lob])
        for text, asked in zip(asking_turns, record["ask_facts"], strict=True):
            assert asked and set(asked) <= still_missing, record["id"]  # facts once given are never asked again
            assert parse_asked_facts(text) == set(asked), (record["id"], text)
            assert set(asked) <= set(FACT_ASK_NAMES)
            still_missing = set(asked)


def test_styles_are_set_varied_and_not_the_generators_families(records):
    styles = Counter(r["style"] for r in records)
    assert all(isinstance(style, str) and style for style in styles)
    assert len(styles) >= 8, styles
    assert not set(styles) & set(generate.SEEN_FAMILIES + generate.HELD_OUT_FAMILIES)
    # every conversation is its own text, not a template with other numbers
    shapes = [re.sub(r"\d", "#", text) for r in records for text in user_texts(r) if len(text) >= 40]
    assert [shape for shape, n in Counter(shapes).items() if n > 1] == []


def test_no_stress_text_appears_in_the_generated_splits(records):
    generated = [
        m["content"]
        for split in GENERATED_SPLITS
        for record in read_jsonl(DATA_DIR / f"{split}.jsonl")
        for m in record["messages"]
        if m["role"] == "user"
    ]
    generated_set, generated_text = set(generated), "\n".join(generated).lower()
    for record in records:
        for text in user_texts(record):
            assert text not in generated_set, (record["id"], text)
            assert len(text) < 20 or text.lower() not in generated_text, (record["id"], text)


def test_data_card_describes_the_stress_split():
    card = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    assert "## Stress split" in card and "never trained on" in card
