"""Tests of the underwriting dataset: the rulebook, the generator and the committed splits.

python -m pytest -q tests/test_dataset.py
"""

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from data import generate, rulebook, worksheet_errors
from data.task import FACT_ASK_NAMES, parse_asked_facts, parse_decision_line

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SIZES = {"train": 900, "validation": 60, "test": 100}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_splits(folder: Path) -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        for split in SIZES
    }


@pytest.fixture(scope="module")
def fresh_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fresh")
    generate.main(["--output-dir", str(folder), "--no-token-stats"])
    return folder


@pytest.fixture(scope="module", params=["committed", "fresh"])
def splits(request, fresh_dir) -> dict[str, list[dict]]:
    return read_splits(DATA_DIR if request.param == "committed" else fresh_dir)


# --- generator ---


def test_same_seed_gives_identical_files(fresh_dir, tmp_path):
    generate.main(["--output-dir", str(tmp_path), "--no-token-stats"])
    for split in SIZES:
        assert sha256_of(tmp_path / f"{split}.jsonl") == sha256_of(fresh_dir / f"{split}.jsonl")


def test_different_seed_gives_different_data(fresh_dir, tmp_path):
    generate.main(["--seed", "99", "--output-dir", str(tmp_path), "--no-token-stats"])
    for split in SIZES:
        assert sha256_of(tmp_path / f"{split}.jsonl") != sha256_of(fresh_dir / f"{split}.jsonl")


def test_train_seed_redraws_only_the_training_split(fresh_dir, tmp_path):
    # A second draw of the training cases, to compare a data change over draws: validation and test
    # stay byte-identical and their profiles stay out of the new training split.
    generate.main(["--train-seed", "99", "--output-dir", str(tmp_path), "--no-token-stats"])
    assert sha256_of(tmp_path / "train.jsonl") != sha256_of(fresh_dir / "train.jsonl")
    for split in ("validation", "test"):
        assert sha256_of(tmp_path / f"{split}.jsonl") == sha256_of(fresh_dir / f"{split}.jsonl")
    splits = read_splits(tmp_path)
    held_out = {record["profile_id"] for split in ("validation", "test") for record in splits[split]}
    assert not held_out & {record["profile_id"] for record in splits["train"]}
    assert "--train-seed 99" in (tmp_path / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("flags", "sentences"),
    [
        (
            ["--near-complete", "0.5", "--pending", "0.3"],
            [
                "50% of the openings followed by asking turns withhold only one fact per later broker turn",
                "30% name a withheld fact as still to come",
            ],
        ),
        (
            ["--hard-amounts", "0.4", "--noise-rows", "0.6"],
            [
                "40% of the dollar amounts are said as bare digits",
                "60% of the table and dump turns carry 1-3 rows the rulebook does not read",
            ],
        ),
    ],
    ids=["near-complete+pending", "hard-amounts+noise-rows"],
)
def test_training_only_options_change_only_train_and_the_card_says_so(fresh_dir, tmp_path, flags, sentences):
    generate.main([*flags, "--output-dir", str(tmp_path), "--no-token-stats"])
    assert sha256_of(tmp_path / "train.jsonl") != sha256_of(fresh_dir / "train.jsonl")
    for split in ("validation", "test"):
        assert sha256_of(tmp_path / f"{split}.jsonl") == sha256_of(fresh_dir / f"{split}.jsonl")
    card = " ".join((tmp_path / "README.md").read_text(encoding="utf-8").split())
    default_card = " ".join((fresh_dir / "README.md").read_text(encoding="utf-8").split())
    for sentence in sentences:
        assert sentence in card
        assert sentence.split("% ", 1)[1] not in default_card


def test_committed_files_are_the_default_generation(fresh_dir):
    for split in SIZES:
        assert sha256_of(DATA_DIR / f"{split}.jsonl") == sha256_of(fresh_dir / f"{split}.jsonl"), (
            f"data/{split}.jsonl is stale: run python data/generate.py"
        )


def test_data_card_lists_rules_hashes_and_balance(fresh_dir):
    card = (fresh_dir / "README.md").read_text(encoding="utf-8")
    for rules in rulebook.RULES.values():
        for rule in rules:
            assert f"| {rule.rule_id} |" in card and rule.description in card
    for split in SIZES:
        assert sha256_of(fresh_dir / f"{split}.jsonl") in card
    assert "majority-class accuracy" in card and "| train | 900 |" in card
    assert "token stats unavailable: skipped (--no-token-stats)" in card


def test_too_small_split_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        generate.main(["--test-size", "5", "--output-dir", str(tmp_path), "--no-token-stats"])


def test_balance_check_fails_loudly():
    records = [
        {"decision": {"outcome": outcome}, "line_of_business": lob}
        for outcome, lob in zip(rulebook.OUTCOMES, rulebook.LINES_OF_BUSINESS, strict=True)
    ]
    generate.check_balance("balanced", records)
    with pytest.raises(ValueError, match="> 50%"):
        generate.check_balance("skewed", records + records[:1] * 2)  # 3 of 5 are approvals
    with pytest.raises(ValueError, match="no records for"):
        generate.check_balance("missing", records[:2] * 2)


# --- splits (committed and freshly generated) ---


def test_sizes_ids_and_disjoint_profiles(splits):
    assert {split: len(records) for split, records in splits.items()} == SIZES
    ids = [record["id"] for records in splits.values() for record in records]
    assert len(ids) == len(set(ids))
    profiles = {split: {record["profile_id"] for record in records} for split, records in splits.items()}
    assert not profiles["train"] & profiles["validation"]
    assert not profiles["test"] & (profiles["train"] | profiles["validation"])


def test_test_split_has_an_unseen_phrasing_family(splits):
    seen = {record["phrasing_family"] for split in ("train", "validation") for record in splits[split]}
    test_families = {record["phrasing_family"] for record in splits["test"]}
    assert test_families - seen


def test_conversation_shape(splits):
    for records in splits.values():
        for record in records:
            roles = [message["role"] for message in record["messages"]]
            assert roles[0] == "system" and roles[-1] == "assistant", record["id"]
            assert roles[1:] == ["user", "assistant"] * (len(roles[1:]) // 2), record["id"]
            assert 1 <= roles.count("user") <= 4, record["id"]
            assert all(message["content"].strip() for message in record["messages"]), record["id"]
        # Complete submissions decided at once (no asking turn) are a share of every split, not all.
        complete = sum(len(record["ask_facts"]) == 0 for record in records) / len(records)
        assert 0.08 <= complete <= 0.30, complete


def test_final_turn_decision_line_matches_record(splits):
    for records in splits.values():
        for record in records:
            parsed = parse_decision_line(record["messages"][-1]["content"])
            expected = {key: record["decision"][key] for key in ("outcome", "risk_class", "rules")}
            assert parsed == expected, record["id"]
            assert record["messages"][-1]["content"].splitlines()[-1].startswith("DECISION: ")


def test_worksheet_checks_match_the_rulebook(splits):
    # Every rule of the line (the grant rule aside) is checked once, on its own line, in rule order.
    # Exactly the rules whose rulebook predicate is true end with ": <effect> -> <running result>":
    # the effect of the first fired rule plus every rule fired so far; the last one is the decision.
    for records in splits.values():
        for record in records:
            lob, facts, decision = record["line_of_business"], record["facts"], record["decision"]
            lines = record["messages"][-1]["content"].splitlines()
            rules = [rule for rule in rulebook.RULES[lob] if rule.applies is not None]
            assert lines[0].startswith("Facts: "), record["id"]
            check_lines = lines[1 : 1 + len(rules)]
            checks = [
                re.fullmatch(r"([LHB]-\d+) [^:]*(?:: (\w+)(?:, condition [^:]*)? -> (.*))?", line)
                for line in check_lines
            ]
            assert all(checks), (record["id"], check_lines)
            expected = [(r.rule_id, r.effect if r.applies(facts) else None) for r in rules]
            assert [(m.group(1), m.group(2)) for m in checks] == expected, record["id"]
            final = next((m.group(3) for m in reversed(checks) if m.group(3)), "none")
            if decision["outcome"] == "approve" and decision["risk_class"] == "preferred":
                assert final == "none", record["id"]
            else:
                label = decision["outcome"] if decision["outcome"] != "approve" else decision["risk_class"]
                assert final == f"{label} {', '.join(decision['rules'])}", record["id"]
            assert len(lines) == len(rules) + 3, record["id"]


def test_running_result_carries_from_line_to_line():
    facts = {**LIFE, "age": 55, "face_amount": 1_500_000, "bmi": 31.2, "smoker": False, "occupation": "nurse"}
    lines = generate.worksheet_checks("term_life", facts, year_keys=set())
    assert lines[0] == "L-1 age 55 > 70 no"
    assert lines[3] == "L-4 age 55 >= 50 yes, face $1500k > $1000k yes: refer -> refer L-4"
    assert lines[1] == "L-2 medical history none = serious no"
    assert lines[6] == "L-7 occupation not hazardous = hazardous no"
    assert lines[7] == "L-8 BMI 31.2 >= 30 yes, BMI 31.2 < 40 yes: standard -> refer L-4, L-8"
    assert rulebook.decide("term_life", facts)["rules"] == ["L-4", "L-8"]
    # A year the broker gave is compared as a year (1970 <= 1975 is age 55 >= 50): no subtraction.
    by_year = generate.worksheet_checks("term_life", facts, year_keys={"age"})
    assert by_year[0] == "L-1 born 1970 < 1955 no"
    assert by_year[3].startswith("L-4 born 1970 <= 1975 yes, face $1500k > $1000k yes: refer")


@pytest.mark.parametrize("year_keys", [set(), {"age", "roof_age", "building_age"}])
def test_check_parts_agree_with_the_rule(splits, year_keys):
    # Each part's yes/no is its own comparison; together ("and", H-8 "exactly one") they give the
    # rulebook predicate's answer, in both the age and the year form.
    for records in splits.values():
        for record in records:
            lob, facts = record["line_of_business"], record["facts"]
            for rule in rulebook.RULES[lob]:
                if rule.applies is None:
                    continue
                truths = [
                    truth for _, truth in generate.check_atoms(rule.rule_id, facts, year_keys) if truth is not None
                ]
                combined = truths[0] != truths[1] if rule.rule_id == "H-8" else all(truths)
                assert combined == rule.applies(facts), (record["id"], rule.rule_id)


def test_worksheet_errors_counts_each_wrong_step():
    facts = {**LIFE, "age": 55, "face_amount": 1_500_000, "bmi": 31.2, "occupation": "nurse"}
    decision = rulebook.decide("term_life", facts)
    reference = generate.write_decision_turn("term_life", facts, decision, set(), random.Random(0))
    # The model says L-1 (age 55 > 70) fires, then forgets that result at L-4, and copies BMI wrong.
    wrong = reference.replace("L-1 age 55 > 70 no\n", "L-1 age 55 > 70 no: decline -> decline L-1\n").replace(
        "BMI 31.2;", "BMI 32.1;"
    )
    record = {"reference": reference, "reference_decision": decision}
    counts = worksheet_errors.score([{**record, "generated": reference}, {**record, "generated": wrong}], "generated")
    assert counts["n_replies"] == 2 and counts["n_checks"] == 18
    assert counts["facts line right"] == 1 and counts["fact BMI"] == 1 and counts["fact age"] == 2
    # The wrong reply's carried result is wrong after L-1, L-2 and L-3 ("decline L-1"), right from L-4.
    assert counts["answer right"] == 17 and counts["result right"] == 15
    # Written results: L-4 and L-8 in both, L-1 in the wrong one; its L-4 ignores the previous result.
    assert counts["n_results"] == 5 and counts["result follows own answer"] == 4
    assert counts["every result follows its answers"] == 1
    assert counts["DECISION follows own last result"] == 2 and counts["outcome right"] == 2


def test_worksheet_facts_restate_every_fact():
    facts = {**LIFE, "age": 42, "face_amount": 1_250_000, "bmi": 31.5, "smoker": True, "occupation": "logger"}
    facts["medical_history"] = "controlled"
    line = generate.worksheet_facts("term_life", facts, year_keys={"age"})
    assert line == (
        "Facts: born 1983; face $1250k; BMI 31.5; smoker yes; medical history controlled; occupation logger, hazardous."
    )
    assert "age 42;" in generate.worksheet_facts("term_life", facts, year_keys=set())
    business = generate.worksheet_checks("small_business_property", {**BUSINESS, "tiv": 5_050_000}, set())
    assert "B-4 5 x revenue $1000k = $5000k, TIV $5050k > $5000k yes: refer -> refer B-4" in business
    homeowners = generate.worksheet_checks("homeowners", {**HOME, "construction": "masonry", "roof_age": 22}, set())
    assert homeowners[2] == "H-3 masonry limit 25, roof 22 > 25 no"


def test_asking_turns_name_exactly_the_missing_facts(splits):
    # ask_facts[i] is what the i-th asking turn asks for: every fact not yet given, and it shrinks.
    for records in splits.values():
        for record in records:
            asks = [m["content"] for m in record["messages"] if m["role"] == "assistant"][:-1]
            assert len(asks) == len(record["ask_facts"]), record["id"]
            for text, missing in zip(asks, record["ask_facts"], strict=True):
                assert parse_asked_facts(text) == set(missing), (record["id"], text)
                assert parse_decision_line(text) is None
            assert all(set(b) < set(a) for a, b in zip(record["ask_facts"], record["ask_facts"][1:])), record["id"]


def _facts_items(text: str) -> list[str]:
    line = text.splitlines()[0]
    assert line.startswith("Facts: ") and line.endswith("."), line
    return line[len("Facts: ") : -1].split("; ")


def test_asking_turns_first_write_the_facts_so_far(splits):
    # Reference: the final worksheet's facts line. An asking turn writes "<label> ?" exactly where a
    # fact is still missing, the final item for every fact given, and a corrected fact's wrong value
    # from the opening until the turn after the broker corrects it.
    corrected_seen = 0
    for records in splits.values():
        for record in records:
            replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
            final = _facts_items(replies[-1])
            keys = rulebook.REQUIRED_FACTS[record["line_of_business"]]
            shown_right = dict.fromkeys(record["corrected"], False)
            for text, missing in zip(replies[:-1], record["ask_facts"], strict=True):
                items = _facts_items(text)
                assert len(items) == len(keys), (record["id"], text)
                for key, item, final_item in zip(keys, items, final, strict=True):
                    if key in missing:
                        assert item == f"{generate.FACT_LABELS[key]} ?", (record["id"], key, text)
                    elif key in record["corrected"]:
                        assert item == final_item or not shown_right[key], (record["id"], key, text)
                        shown_right[key] = item == final_item
                    else:
                        assert item == final_item, (record["id"], key, text)
            for key in record["corrected"]:  # said wrong in the opening: the first asking turn keeps it wrong
                assert _facts_items(replies[0])[keys.index(key)] != final[keys.index(key)], record["id"]
                corrected_seen += 1
    assert corrected_seen > 50


def test_asked_fact_names_do_not_overlap():
    # parse_asked_facts reads names by substring: no name may contain another.
    names = list(FACT_ASK_NAMES.values())
    assert not [(a, b) for a in names for b in names if a != b and a.lower() in b.lower()]
    assert parse_asked_facts("Thanks. I still need THE BMI and smoking status.") == {"bmi", "smoker"}
    assert parse_asked_facts("DECISION: approve | CLASS: preferred | RULES: L-10") == set()


def test_rulebook_rederives_every_decision(splits):
    for records in splits.values():
        for record in records:
            assert set(record["facts"]) == set(rulebook.REQUIRED_FACTS[record["line_of_business"]])
            assert rulebook.decide(record["line_of_business"], record["facts"]) == record["decision"], record["id"]


def test_class_balance(splits):
    for split, records in splits.items():
        outcomes = Counter(record["decision"]["outcome"] for record in records)
        lines = Counter(record["line_of_business"] for record in records)
        assert max(outcomes.values()) <= len(records) / 2, (split, outcomes)
        assert set(outcomes) == set(rulebook.OUTCOMES), (split, outcomes)
        assert set(lines) == set(rulebook.LINES_OF_BUSINESS), (split, lines)


def test_every_rule_fires_in_train(splits):
    fired = {rule_id for record in splits["train"] for rule_id in record["decision"]["rules"]}
    assert fired == {rule.rule_id for rules in rulebook.RULES.values() for rule in rules}


# --- rulebook units: a clean case per line, then one change at a time ---

LIFE = {
    "age": 35,
    "face_amount": 500_000,
    "bmi": 24.0,
    "smoker": False,
    "medical_history": "none",
    "occupation": "teacher",
}
HOME = {
    "construction": "masonry",
    "roof_age": 10,
    "fire_station_miles": 2.0,
    "hydrant_feet": 500,
    "prior_claims": 0,
    "wind_zone": "inland",
    "dwelling_value": 400_000,
}
BUSINESS = {
    "occupancy": "accounting office",
    "sprinklered": True,
    "building_age": 10,
    "wiring_updated": True,
    "annual_revenue": 1_000_000,
    "tiv": 2_000_000,
    "prior_losses": 0,
}
BASES = {"term_life": LIFE, "homeowners": HOME, "small_business_property": BUSINESS}


@pytest.mark.parametrize(
    "lob, changes, outcome, risk_class, rules",
    [
        ("term_life", {}, "approve", "preferred", ["L-10"]),
        ("term_life", {"age": 70}, "approve", "preferred", ["L-10"]),
        ("term_life", {"age": 71}, "decline", "n/a", ["L-1"]),
        # L-4 interaction: age >= 50 AND face > $1M.
        ("term_life", {"age": 50, "face_amount": 1_000_000}, "approve", "preferred", ["L-10"]),
        ("term_life", {"age": 49, "face_amount": 3_000_000}, "approve", "preferred", ["L-10"]),
        ("term_life", {"age": 50, "face_amount": 1_025_000}, "refer", "n/a", ["L-4"]),
        # L-5 interaction: smoker AND BMI >= 35.
        ("term_life", {"smoker": True, "bmi": 34.9}, "approve", "substandard", ["L-6", "L-8"]),
        ("term_life", {"smoker": True, "bmi": 35.0}, "refer", "n/a", ["L-5", "L-6", "L-8"]),
        ("term_life", {"bmi": 35.0}, "approve", "standard", ["L-8"]),
        ("term_life", {"bmi": 29.9}, "approve", "preferred", ["L-10"]),
        ("term_life", {"bmi": 40.0}, "decline", "n/a", ["L-3"]),
        ("term_life", {"medical_history": "serious", "smoker": True}, "decline", "n/a", ["L-2", "L-6"]),
        (
            "term_life",
            {"occupation": "commercial diver", "medical_history": "controlled"},
            "approve",
            "substandard",
            ["L-7", "L-9"],
        ),
        ("homeowners", {}, "approve", "preferred", ["H-9"]),
        # H-3 interaction: the roof limit depends on construction.
        ("homeowners", {"construction": "frame", "roof_age": 20}, "approve", "standard", ["H-7"]),
        ("homeowners", {"construction": "frame", "roof_age": 21}, "refer", "n/a", ["H-3"]),
        ("homeowners", {"roof_age": 21}, "approve", "standard", ["H-7"]),
        ("homeowners", {"roof_age": 26}, "refer", "n/a", ["H-3"]),
        ("homeowners", {"roof_age": 14}, "approve", "preferred", ["H-9"]),
        # H-2 interaction: far from a station AND from a hydrant.
        ("homeowners", {"fire_station_miles": 5.0, "hydrant_feet": 1000}, "approve", "preferred", ["H-9"]),
        ("homeowners", {"fire_station_miles": 5.1, "hydrant_feet": 1000}, "approve", "standard", ["H-8"]),
        ("homeowners", {"fire_station_miles": 5.1, "hydrant_feet": 1050}, "decline", "n/a", ["H-2"]),
        # H-4 interaction: coastal AND value > $1M.
        ("homeowners", {"wind_zone": "coastal", "dwelling_value": 1_000_000}, "approve", "substandard", ["H-6"]),
        ("homeowners", {"wind_zone": "coastal", "dwelling_value": 1_025_000}, "refer", "n/a", ["H-4", "H-6"]),
        ("homeowners", {"dwelling_value": 2_500_000}, "approve", "preferred", ["H-9"]),
        ("homeowners", {"prior_claims": 2}, "approve", "substandard", ["H-5"]),
        ("homeowners", {"prior_claims": 3}, "decline", "n/a", ["H-1"]),
        ("small_business_property", {}, "approve", "preferred", ["B-9"]),
        # B-1 / B-5 interaction: hazard class with sprinklers.
        ("small_business_property", {"occupancy": "woodworking shop", "sprinklered": False}, "decline", "n/a", ["B-1"]),
        ("small_business_property", {"occupancy": "woodworking shop"}, "approve", "substandard", ["B-5"]),
        ("small_business_property", {"occupancy": "bakery", "sprinklered": False}, "approve", "standard", ["B-8"]),
        ("small_business_property", {"sprinklered": False}, "approve", "preferred", ["B-9"]),
        # B-3 / B-7 interaction: building age with wiring.
        ("small_business_property", {"building_age": 30, "wiring_updated": False}, "approve", "preferred", ["B-9"]),
        ("small_business_property", {"building_age": 50, "wiring_updated": False}, "approve", "standard", ["B-7"]),
        ("small_business_property", {"building_age": 51, "wiring_updated": False}, "refer", "n/a", ["B-3"]),
        ("small_business_property", {"building_age": 90}, "approve", "preferred", ["B-9"]),
        # B-4: TIV vs revenue, exactly 5x is fine.
        ("small_business_property", {"tiv": 5_000_000}, "approve", "preferred", ["B-9"]),
        ("small_business_property", {"tiv": 5_050_000}, "refer", "n/a", ["B-4"]),
        ("small_business_property", {"prior_losses": 2}, "approve", "substandard", ["B-6"]),
        ("small_business_property", {"prior_losses": 3, "tiv": 9_000_000}, "decline", "n/a", ["B-2", "B-4"]),
    ],
)
def test_rulebook_cases(lob, changes, outcome, risk_class, rules):
    decision = rulebook.decide(lob, {**BASES[lob], **changes})
    assert (decision["outcome"], decision["risk_class"], decision["rules"]) == (outcome, risk_class, rules)
    if outcome != "approve":
        assert decision["conditions"] == []


def test_conditions_follow_fired_rules_on_approval_only():
    approved = rulebook.decide("homeowners", {**HOME, "construction": "frame", "roof_age": 18, "wind_zone": "coastal"})
    assert approved["conditions"] == ["5% named-storm deductible", "roof inspection within 30 days"]
    referred = rulebook.decide(
        "homeowners", {**HOME, "roof_age": 18, "wind_zone": "coastal", "dwelling_value": 2_000_000}
    )
    assert referred["outcome"] == "refer" and referred["conditions"] == []
    life = rulebook.decide("term_life", {**LIFE, "medical_history": "controlled"})
    assert life["conditions"] == ["attending physician statement before issue"]


def test_decide_rejects_bad_cases():
    with pytest.raises(ValueError, match="missing facts: bmi"):
        rulebook.decide("term_life", {key: value for key, value in LIFE.items() if key != "bmi"})
    with pytest.raises(ValueError, match="unknown line of business"):
        rulebook.decide("marine", LIFE)
    with pytest.raises(ValueError, match="unknown occupancy"):
        rulebook.decide("small_business_property", {**BUSINESS, "occupancy": "spaceport"})


def test_rule_ids_sort_by_number():
    assert sorted(["L-10", "L-2", "L-1"], key=rulebook.rule_sort_key) == ["L-1", "L-2", "L-10"]
    for rules in rulebook.RULES.values():
        ids = [rule.rule_id for rule in rules]
        assert ids == sorted(ids, key=rulebook.rule_sort_key)
        assert sum(rule.effect == "preferred" for rule in rules) == 1


def test_readme_and_makefile_state_the_generators_default_sizes():
    # What a user reads (README's command line, the Makefile's recipe comment) is what generate.py makes.
    args = generate.parse_args([])
    readme = (DATA_DIR.parent / "README.md").read_text(encoding="utf-8")
    makefile = (DATA_DIR.parent / "Makefile").read_text(encoding="utf-8")
    assert f"train {args.train_size} / validation {args.validation_size} / test {args.test_size}" in readme
    assert f"over the {args.train_size} training conversations" in " ".join(makefile.replace("#", "").split())
    assert {"train": args.train_size, "validation": args.validation_size, "test": args.test_size} == SIZES
