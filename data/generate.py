"""Generate the synthetic underwriting conversations and their data card.

Each record is a short chat: a broker presents a term life, homeowners or small-business
property submission with some or all of the facts, the assistant writes the facts so far ("?" where
missing) and asks for the rest (1-4 user turns in all), and the last assistant turn works out the
decision of `data/rulebook.py` on a worksheet
(facts restated, every rule checked on its own line with the running result) and ends with a
machine-readable line such as
`DECISION: approve | CLASS: standard | RULES: L-8`.

Sampling is stratified so every split holds ~40% approvals (split over three risk classes), 30%
referrals and 30% declines, per line of business. The test split uses fresh profiles and adds a
phrasing family (`form_fields`) that train and validation never show. Same seed -> byte-identical
files.

    python data/generate.py                                  # seed 1234 -> data/*.jsonl + data/README.md
    python data/generate.py --seed 7 --output-dir /tmp/uw --no-token-stats
    python data/generate.py --tokenizer Qwen/Qwen2.5-0.5B-Instruct   # token stats for another model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
from collections import Counter
from collections.abc import Collection
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # `python data/generate.py` puts data/ on sys.path, but the imports below live under the root.
    sys.path.insert(0, str(REPO_ROOT))

from data import families, rulebook  # noqa: E402
from data.families import HELD_OUT_FAMILIES, ROUND_AMOUNTS, SEEN_FAMILIES, join_items, write_user_turn, wrong_value  # noqa: E402
from data.task import FACT_ASK_NAMES, format_decision_line  # noqa: E402

SPLITS = ("train", "validation", "test")
# Target share of each (outcome, risk class) cell within every line of business and split.
CELL_SHARES = {
    ("approve", "preferred"): 0.14,
    ("approve", "standard"): 0.13,
    ("approve", "substandard"): 0.13,
    ("refer", "n/a"): 0.30,
    ("decline", "n/a"): 0.30,
}
HELD_OUT_SHARE = 0.25  # share of the test split written in HELD_OUT_FAMILIES
CORRECTION_SHARE = 0.25  # conversations where the opening says one fact wrong and a later turn corrects it
USER_TURN_WEIGHTS = {1: 2, 2: 5, 3: 4, 4: 1}  # 1: a complete submission, decided at once
MAX_SAMPLING_TRIES = 20_000
PROFILE_PREFIX = {"term_life": "life", "homeowners": "home", "small_business_property": "biz"}

SYSTEM_PROMPTS = (
    "You are an insurance underwriting assistant. Ask for missing facts, then decide by the rulebook "
    f"(ages as of {rulebook.REFERENCE_YEAR}).",
    "You are an insurance underwriting assistant. Gather missing facts, apply the rulebook "
    f"(year {rulebook.REFERENCE_YEAR}) and end with a DECISION line.",
)

ASK_FIRST = (
    "Thanks. Could you send {items}?",
    "Before I can decide, I need {items}.",
    "To apply the rulebook I still need {items}.",
    "Thanks, please confirm {items}.",
)
ASK_AGAIN = ("Thanks. I still need {items}.", "Got it. And {items}?", "Noted. Please also send {items}.")
OUTCOME_SENTENCES = {
    "approve": (
        "Approve at {risk_class}.",
        "This qualifies for approval at {risk_class}.",
        "Approved, class {risk_class}.",
    ),
    "refer": ("Refer to a senior underwriter.", "I am referring this to a senior underwriter."),
    "decline": ("Decline.", "I have to decline this submission."),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # --- sampling ---
    parser.add_argument("--seed", type=int, default=1234, help="seed; the same seed gives byte-identical files")
    parser.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="draw the training split with this seed instead (validation and test stay those of --seed): "
        "compare a data change over several draws of the training cases",
    )
    parser.add_argument("--train-size", type=int, default=900, help="records in train.jsonl")
    parser.add_argument("--validation-size", type=int, default=60, help="records in validation.jsonl")
    parser.add_argument("--test-size", type=int, default=100, help="records in test.jsonl")
    parser.add_argument(
        "--extra-forms",
        type=float,
        default=families.EXTRA_FORM_SHARE,
        help="share of the training split's facts said in an extra form (decimal comma, 410.000 USD, ...); default 0: none",
    )
    parser.add_argument(
        "--extra-frames",
        type=float,
        default=families.EXTRA_FRAME_SHARE,
        help="share of the training split's facts said in another sentence (families.EXTRA_FRAMES); 0: none",
    )
    parser.add_argument(
        "--mixed-styles",
        type=float,
        default=families.MIX_SHARE,
        help="share of the training split's facts said in another style's words or field name; 0: none",
    )
    parser.add_argument(
        "--near-complete",
        type=float,
        default=families.NEAR_COMPLETE_SHARE,
        help="share of the training split's openings that withhold only one fact per later broker turn",
    )
    parser.add_argument(
        "--pending",
        type=float,
        default=families.PENDING_SHARE,
        help="share of the training split's openings that name a withheld fact as pending ('roof age to follow')",
    )
    parser.add_argument(
        "--hard-amounts",
        type=float,
        default=families.HARD_AMOUNT_SHARE,
        help="share of the training split's dollar amounts said as bare digits or in words; 0: none",
    )
    parser.add_argument(
        "--noise-rows",
        type=float,
        default=families.NOISE_ROW_SHARE,
        help="share of the training split's tables and dumps with rows the rulebook does not read; 0: none",
    )
    # --- output ---
    parser.add_argument(
        "--output-dir", type=Path, default=Path(__file__).resolve().parent, help="folder for the splits and README.md"
    )
    # --- data card ---
    parser.add_argument(
        "--tokenizer", default="smollm2-135m-instruct", help="tokenizer (alias, folder or hub id) for token stats"
    )
    parser.add_argument("--no-token-stats", action="store_true", help="skip loading a tokenizer for the card")
    args = parser.parse_args(argv)
    minimum = len(rulebook.LINES_OF_BUSINESS) * len(CELL_SHARES)
    for split in SPLITS:
        size = getattr(args, f"{split}_size")
        if size < minimum:
            parser.error(f"--{split}-size must be at least {minimum} so every line and outcome appears; got {size}")
    return args


def allocate(total: int, weights: dict) -> dict:
    """Split `total` items over the keys of `weights` proportionally.

    Args:
        total: number of items to hand out.
        weights: key -> relative weight.

    Returns:
        key -> count, summing to `total` (largest remainder method, ties broken in key order).
    """
    norm = sum(weights.values())
    exact = {key: total * weight / norm for key, weight in weights.items()}
    counts = {key: math.floor(value) for key, value in exact.items()}
    by_remainder = sorted(weights, key=lambda key: counts[key] - exact[key])  # stable: ties keep key order
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def sample_facts(line_of_business: str, rng: random.Random) -> dict:
    """Draw the facts of one random case.

    A share of the values sits exactly on rule thresholds (age 50/70, BMI 35.0, 5 miles, 1,000 ft,
    5x revenue, ...) so the data teaches which side of each boundary a rule fires on.

    Args:
        line_of_business: one of rulebook.LINES_OF_BUSINESS.
        rng: the split's random generator.

    Returns:
        A dict with exactly the keys of rulebook.REQUIRED_FACTS[line_of_business].
    """
    if line_of_business == "term_life":
        face_amount = rng.choice(ROUND_AMOUNTS) if rng.random() < 0.25 else rng.randrange(100_000, 3_000_001, 25_000)
        hazardous = rng.random() < 0.25
        bmi = round(rng.triangular(18.5, 44.0, 26.0), 1)
        return {
            "age": rng.choice([49, 50, 70, 71]) if rng.random() < 0.15 else rng.randint(18, 78),
            "face_amount": face_amount,
            "bmi": rng.choice([29.9, 30.0, 34.9, 35.0, 39.9, 40.0]) if rng.random() < 0.1 else bmi,
            "smoker": rng.random() < 0.3,
            "medical_history": rng.choices(rulebook.MEDICAL_HISTORIES, weights=[6, 3, 1.5])[0],
            "occupation": rng.choice(sorted(o for o, h in rulebook.LIFE_OCCUPATIONS.items() if h == hazardous)),
        }
    if line_of_business == "homeowners":
        station = round(rng.uniform(0.3, 5.0) if rng.random() < 0.7 else rng.uniform(5.1, 12.0), 1)
        hydrant = rng.randrange(50, 1001, 50) if rng.random() < 0.7 else rng.randrange(1050, 3001, 50)
        value = rng.choice(ROUND_AMOUNTS) if rng.random() < 0.2 else rng.randrange(150_000, 2_500_001, 25_000)
        return {
            "construction": rng.choices(rulebook.CONSTRUCTION_TYPES, weights=[5, 3, 2])[0],
            "roof_age": rng.randint(2, 35),
            "fire_station_miles": 5.0 if rng.random() < 0.08 else station,
            "hydrant_feet": 1000 if rng.random() < 0.08 else hydrant,
            "prior_claims": rng.choices(range(5), weights=[50, 22, 14, 9, 5])[0],
            "wind_zone": "coastal" if rng.random() < 0.3 else "inland",
            "dwelling_value": value,
        }
    revenue = rng.randrange(200_000, 5_000_001, 50_000)
    ratio = 5.0 if rng.random() < 0.08 else rng.uniform(0.5, 8.0)
    return {
        "occupancy": rng.choice(sorted(rulebook.OCCUPANCY_HAZARD)),
        "sprinklered": rng.random() < 0.5,
        "building_age": rng.choice([30, 31, 50, 51]) if rng.random() < 0.12 else rng.randint(2, 90),
        "wiring_updated": rng.random() < 0.55,
        "annual_revenue": revenue,
        "tiv": max(100_000, round(revenue * ratio / 50_000) * 50_000),
        "prior_losses": rng.choices(range(5), weights=[50, 25, 13, 8, 4])[0],
    }


def build_profile_id(line_of_business: str, facts: dict) -> str:
    """Name a profile by a hash of its facts, so equal facts mean equal ids across splits."""
    payload = json.dumps([line_of_business, facts], sort_keys=True)
    return f"{PROFILE_PREFIX[line_of_business]}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


# --- the worksheet of the final reply: facts restated in a fixed order, then every rule checked ---
# A 135M model cannot hold a whole rulebook decision in one token. Writing each fact once, in the
# rulebook's order and units, and then each rule's comparison next to its answer turns the decision
# into short local steps (copy a number, compare it with the threshold beside it, list the yeses).
# The yes/no of every check comes from `rule.applies`, so rulebook.decide() stays the only source
# of labels; the texts below only say what each rule looks at.


def _money(amount: int) -> str:
    """Dollars in thousands ("$825k", "$17500k"): every amount here is a whole number of thousands,
    and the short form keeps comparisons to a few digit tokens (the tokenizer splits every digit)."""
    return f"${amount // 1000}k"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


AGE_LABELS = {"age": ("age", "born"), "roof_age": ("roof", "roof built"), "building_age": ("building", "built")}
# An age compared with a limit is the year compared with (reference year - limit), sign flipped.
FLIPPED = {">": "<", ">=": "<=", "<=": ">=", "<": ">"}
COMPARE = {">": int.__gt__, ">=": int.__ge__, "<=": int.__le__, "<": int.__lt__}


def _age_fact(key: str, facts: dict, year_keys: set[str]) -> str:
    """An age fact as the broker gave it: "age 42" / "roof 5 years", or "born 1983" / "roof built 2020"."""
    age_label, year_label = AGE_LABELS[key]
    if key in year_keys:
        return f"{year_label} {rulebook.REFERENCE_YEAR - facts[key]}"
    return f"{age_label} {facts[key]}" + ("" if key == "age" else " years")


def _age_atom(key: str, op: str, limit: int, facts: dict, year_keys: set[str]) -> tuple[str, bool]:
    """One age comparison, written in the unit the broker used, so no subtraction is needed.

    "age 42 > 70" for an age; for a year the same test on the year: born 1983 < 1955 (2025 - 70).
    """
    age_label, year_label = AGE_LABELS[key]
    truth = COMPARE[op](facts[key], limit)
    if key in year_keys:
        year, bound = rulebook.REFERENCE_YEAR - facts[key], rulebook.REFERENCE_YEAR - limit
        return f"{year_label} {year} {FLIPPED[op]} {bound}", truth
    return f"{age_label} {facts[key]} {op} {limit}", truth


# How the facts line names a fact not given yet ("BMI ?"), in an asking turn.
FACT_LABELS = {
    "age": "age",
    "face_amount": "face",
    "bmi": "BMI",
    "smoker": "smoker",
    "medical_history": "medical history",
    "occupation": "occupation",
    "construction": "construction",
    "roof_age": "roof",
    "fire_station_miles": "fire station",
    "hydrant_feet": "hydrant",
    "prior_claims": "claims",
    "wind_zone": "wind zone",
    "dwelling_value": "dwelling",
    "occupancy": "occupancy",
    "sprinklered": "sprinklered",
    "building_age": "building",
    "wiring_updated": "wiring updated",
    "annual_revenue": "revenue",
    "tiv": "TIV",
    "prior_losses": "losses",
}


def worksheet_facts(lob: str, facts: dict, year_keys: set[str], missing: Collection[str] = ()) -> str:
    """The facts line: every fact the rulebook reads, in REQUIRED_FACTS order and canonical units.

    Args:
        lob: line of business.
        facts: the case facts.
        year_keys: the age facts the broker stated as a year ("born 1983"): kept as the year.
        missing: facts not given yet, written as "<label> ?" (an asking turn's facts line).

    Returns:
        e.g. "Facts: born 1983; face $500k; BMI 27.1; smoker no; medical history none; occupation
        teacher, not hazardous." or, with missing={"bmi"}, "...; BMI ?; ...".
    """
    f = facts
    if lob == "term_life":
        hazardous = _occupation_hazard(f["occupation"])
        items = [
            _age_fact("age", f, year_keys),
            f"face {_money(f['face_amount'])}",
            f"BMI {f['bmi']}",
            f"smoker {_yes(f['smoker'])}",
            f"medical history {f['medical_history']}",
            f"occupation {f['occupation']}, {hazardous}",
        ]
    elif lob == "homeowners":
        items = [
            f"construction {f['construction'].replace('_', '-')}",
            _age_fact("roof_age", f, year_keys),
            f"fire station {f['fire_station_miles']:g} miles",
            f"hydrant {f['hydrant_feet']} ft",
            f"claims {f['prior_claims']}",
            f"wind zone {f['wind_zone']}",
            f"dwelling {_money(f['dwelling_value'])}",
        ]
    else:
        items = [
            f"occupancy {f['occupancy']}, {rulebook.OCCUPANCY_HAZARD[f['occupancy']]} hazard",
            f"sprinklered {_yes(f['sprinklered'])}",
            _age_fact("building_age", f, year_keys),
            f"wiring updated {_yes(f['wiring_updated'])}",
            f"revenue {_money(f['annual_revenue'])}",
            f"TIV {_money(f['tiv'])}",
            f"losses {f['prior_losses']}",
        ]
    keys = rulebook.REQUIRED_FACTS[lob]
    items = [f"{FACT_LABELS[key]} ?" if key in missing else item for key, item in zip(keys, items, strict=True)]
    return "Facts: " + "; ".join(items) + "."


def _occupation_hazard(occupation: str) -> str:
    """How the worksheet writes a life occupation's rule-L-7 flag: "hazardous" or "not hazardous"."""
    return "hazardous" if rulebook.LIFE_OCCUPATIONS[occupation] else "not hazardous"


def _tiv_atoms(f: dict) -> list[tuple[str, bool | None]]:
    """B-4's steps: 5 x revenue worked out first (no yes/no), then the TIV compared with it."""
    limit = 5 * f["annual_revenue"]
    return [
        (f"5 x revenue {_money(f['annual_revenue'])} = {_money(limit)}", None),
        (f"TIV {_money(f['tiv'])} > {_money(limit)}", f["tiv"] > limit),
    ]


def _is(name: str, value: str, target: str) -> tuple[str, bool]:
    """A fact compared with the value a rule looks for, the fact's value copied: "smoker no = yes"."""
    return f"{name} {value} = {target}", value == target


def check_atoms(rule_id: str, f: dict, year_keys: set[str]) -> list[tuple[str, bool | None]]:
    """The steps one rule takes, each with its truth, written with the case's numbers and words.

    Every comparison gets its own yes/no, a categorical fact included ("wind zone inland = coastal
    no": the value is copied beside the value the rule wants, so no lookup in the Facts line is
    needed). A step that only looks up or works out a number the next comparison uses (H-3's roof
    limit for the construction, B-4's 5 x revenue) has truth None and no yes/no.

    Args:
        rule_id: e.g. "H-2".
        f: the case facts.
        year_keys: the age facts the broker stated as a year (compared as years).

    Returns:
        [(text, truth), ...], e.g. [("station 7.2 > 5", True), ("hydrant 1350 > 1000", True)].
    """
    hazard = rulebook.OCCUPANCY_HAZARD.get(f.get("occupancy", ""), "")
    money = _money
    roof_limit = rulebook.roof_age_limit(f["construction"]) if "construction" in f else 0
    roof_step = (f"{f.get('construction', '').replace('_', '-')} limit {roof_limit}", None)
    station_hydrant = (
        [
            (f"station {f['fire_station_miles']:g} > 5", f["fire_station_miles"] > 5),
            (f"hydrant {f['hydrant_feet']} > 1000", f["hydrant_feet"] > 1000),
        ]
        if "fire_station_miles" in f
        else []
    )
    atoms = {
        "L-1": lambda: [_age_atom("age", ">", 70, f, year_keys)],
        "L-2": lambda: [_is("medical history", f["medical_history"], "serious")],
        "L-3": lambda: [(f"BMI {f['bmi']} >= 40", f["bmi"] >= 40)],
        "L-4": lambda: [
            _age_atom("age", ">=", 50, f, year_keys),
            (f"face {money(f['face_amount'])} > $1000k", f["face_amount"] > 1_000_000),
        ],
        "L-5": lambda: [_is("smoker", _yes(f["smoker"]), "yes"), (f"BMI {f['bmi']} >= 35", f["bmi"] >= 35)],
        "L-6": lambda: [_is("smoker", _yes(f["smoker"]), "yes")],
        "L-7": lambda: [_is("occupation", _occupation_hazard(f["occupation"]), "hazardous")],
        "L-8": lambda: [(f"BMI {f['bmi']} >= 30", f["bmi"] >= 30), (f"BMI {f['bmi']} < 40", f["bmi"] < 40)],
        "L-9": lambda: [_is("medical history", f["medical_history"], "controlled")],
        "H-1": lambda: [(f"claims {f['prior_claims']} >= 3", f["prior_claims"] >= 3)],
        "H-2": lambda: station_hydrant,
        "H-3": lambda: [roof_step, _age_atom("roof_age", ">", roof_limit, f, year_keys)],
        "H-4": lambda: [
            _is("wind zone", f["wind_zone"], "coastal"),
            (f"dwelling {money(f['dwelling_value'])} > $1000k", f["dwelling_value"] > 1_000_000),
        ],
        "H-5": lambda: [(f"claims {f['prior_claims']} = 2", f["prior_claims"] == 2)],
        "H-6": lambda: [_is("wind zone", f["wind_zone"], "coastal")],
        "H-7": lambda: [
            roof_step,
            _age_atom("roof_age", ">=", 15, f, year_keys),
            _age_atom("roof_age", "<=", roof_limit, f, year_keys),
        ],
        "H-8": lambda: station_hydrant,
        "B-1": lambda: [_is("hazard", hazard, "high"), _is("sprinklered", _yes(f["sprinklered"]), "no")],
        "B-2": lambda: [(f"losses {f['prior_losses']} >= 3", f["prior_losses"] >= 3)],
        "B-3": lambda: [
            _age_atom("building_age", ">", 50, f, year_keys),
            _is("wiring updated", _yes(f["wiring_updated"]), "no"),
        ],
        "B-4": lambda: _tiv_atoms(f),
        "B-5": lambda: [_is("hazard", hazard, "high"), _is("sprinklered", _yes(f["sprinklered"]), "yes")],
        "B-6": lambda: [(f"losses {f['prior_losses']} = 2", f["prior_losses"] == 2)],
        "B-7": lambda: [
            _age_atom("building_age", ">", 30, f, year_keys),
            _age_atom("building_age", "<=", 50, f, year_keys),
            _is("wiring updated", _yes(f["wiring_updated"]), "no"),
        ],
        "B-8": lambda: [_is("hazard", hazard, "moderate"), _is("sprinklered", _yes(f["sprinklered"]), "no")],
    }
    return atoms[rule_id]()


def worksheet_checks(lob: str, facts: dict, year_keys: set[str]) -> list[str]:
    """The check lines: every rule of the line (the grant rule aside), one per line, in rule order.

    Each line writes the rule's steps with the case's numbers, every comparison with its own yes/no
    (one comparison per step, so no step needs two). A rule that does not fire ends there. A rule
    that fires adds ":", its effect and, after "->", the running result: the effect of the first
    fired rule (rules go from most to least severe, so the first fired one decides) and every rule
    fired so far. The result is written only where it changes, so the last "->" of the worksheet is
    the decision, and each one is a local step: copy the previous result and append the rule. A
    fired rule that attaches a condition to an approval writes it after its effect
    (": standard, condition roof inspection within 30 days -> standard H-7") unless a decline or
    refer already fired, so the outcome sentence's "Condition: ..." copies from the lines above.

    Args:
        lob: line of business.
        facts: the case facts.
        year_keys: the age facts the broker stated as a year.

    Returns:
        e.g. ["L-1 age 54 > 70 no", ..., "L-4 age 54 >= 50 yes, face $1500k > $1000k yes: refer ->
        refer L-4", ...].
    """
    lines, first_effect, fired = [], None, []
    for rule in rulebook.RULES[lob]:
        if rule.applies is None:
            continue
        atoms = check_atoms(rule.rule_id, facts, year_keys)
        comparison = ", ".join(text if truth is None else f"{text} {_yes(truth)}" for text, truth in atoms)
        if rule.rule_id == "H-8":
            comparison = "exactly one of " + comparison
        line = f"{rule.rule_id} {comparison}"
        if rule.applies(facts):
            first_effect = first_effect or rule.effect
            fired.append(rule.rule_id)
            # A condition binds only an approval: no earlier decline or refer (those rules come first).
            approving = rule.condition and first_effect not in ("decline", "refer")
            condition = f", condition {rule.condition}" if approving else ""
            line += f": {rule.effect}{condition} -> {first_effect} {', '.join(fired)}"
        lines.append(line)
    return lines


def write_decision_turn(lob: str, facts: dict, decision: dict, year_keys: set[str], rng: random.Random) -> str:
    """Write the final assistant turn: the facts, one line per rule check, the outcome, the DECISION line.

    Args:
        lob: line of business.
        facts: the case facts.
        decision: `rulebook.decide()` output for the case.
        year_keys: the age facts the broker said as a year.
        rng: the split's random generator.

    Returns:
        "Facts: ...", the check lines of `worksheet_checks` (the last running result is the
        decision), the outcome sentence with any conditions, then the DECISION line; one line each.
    """
    outcome = rng.choice(OUTCOME_SENTENCES[decision["outcome"]]).format(risk_class=decision["risk_class"])
    if decision["conditions"]:
        outcome += " " + rng.choice(["Condition: {c}.", "Subject to: {c}."]).format(c="; ".join(decision["conditions"]))
    lines = [
        worksheet_facts(lob, facts, year_keys),
        *worksheet_checks(lob, facts, year_keys),
        outcome,
        format_decision_line(decision["outcome"], decision["risk_class"], decision["rules"]),
    ]
    return "\n".join(lines)


def build_conversation(
    lob: str, facts: dict, decision: dict, family: str, rng: random.Random
) -> tuple[list[dict], list[list[str]], dict]:
    """Build the chat: system, opening submission, 0-3 ask/answer exchanges, final decision.

    In CORRECTION_SHARE of the chats the opening says one fact wrong and a random later broker
    turn corrects it; the assistant only asks for facts never given, and the worksheet uses the
    corrected value (the one in `facts`). While `families.use_extra_forms` turns them on (the
    training split only), an opening may withhold only one fact per later turn and name one
    withheld fact as pending.

    Args:
        lob: line of business.
        facts: the case facts.
        decision: `rulebook.decide(lob, facts)`.
        family: phrasing family of the broker turns.
        rng: the split's random generator.

    Returns:
        (messages, ask_facts, corrected): [{"role", "content"}, ...] starting with system and
        ending with the assistant's decision; for each asking assistant turn, in order, the fact
        names (keys of REQUIRED_FACTS) still missing at that point, which that turn asks for; and
        {fact: the wrong value said first} for a corrected fact ({} when none).
    """
    keys = list(rulebook.REQUIRED_FACTS[lob])
    rng.shuffle(keys)
    user_turns = rng.choices(list(USER_TURN_WEIGHTS), weights=list(USER_TURN_WEIGHTS.values()))[0]
    first_count = len(keys) if user_turns == 1 else rng.randint(2, len(keys) - (user_turns - 1))
    if user_turns > 1 and families.near_complete_drawn():
        first_count = len(keys) - (user_turns - 1)
    missing = keys[first_count:]
    cuts = sorted(rng.sample(range(1, len(missing)), user_turns - 2)) if user_turns > 2 else []
    groups = [missing[a:b] for a, b in zip([0, *cuts], [*cuts, len(missing)], strict=True)] if missing else []
    corrected, fix_turn = {}, -1
    if groups and rng.random() < CORRECTION_SHARE:  # a correction needs a later broker turn
        key = rng.choice(keys[:first_count])
        corrected, fix_turn = {key: wrong_value(key, facts[key], rng)}, rng.randrange(len(groups))

    year_keys: set[str] = set()
    ask_facts: list[list[str]] = []
    pending = families.pending_drawn(missing)
    opening = write_user_turn(lob, keys[:first_count], facts | corrected, family, rng, True, year_keys, pending=pending)
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, {"role": "user", "content": opening}]
    for index, group in enumerate(groups):
        # The assistant always asks for everything still missing; the broker may answer only part.
        # It first writes the facts so far ("?" where missing, a wrong value until it is corrected),
        # so asking or deciding follows from a line it wrote, as the decision follows from the worksheet.
        unanswered = {k for g in groups[index:] for k in g}
        still_missing = [k for k in rulebook.REQUIRED_FACTS[lob] if k in unanswered]
        ask_facts.append(still_missing)
        told = facts | corrected if index <= fix_turn else facts
        template = rng.choice(ASK_FIRST if index == 0 else ASK_AGAIN)
        ask = template.format(items=join_items([FACT_ASK_NAMES[k] for k in still_missing]))
        ask = worksheet_facts(lob, told, year_keys, missing=unanswered) + "\n" + ask
        messages.append({"role": "assistant", "content": ask})
        fixes = tuple(corrected) if index == fix_turn else ()
        answer = write_user_turn(lob, group, facts, family, rng, False, year_keys, corrected=fixes)
        messages.append({"role": "user", "content": answer})
    messages.append({"role": "assistant", "content": write_decision_turn(lob, facts, decision, year_keys, rng)})
    return messages, ask_facts, corrected


def build_split(
    split: str,
    size: int,
    seed: int,
    seen_profiles: set[str],
    extra_share: float = 0.0,
    frame_share: float = 0.0,
    mix_share: float = 0.0,
    near_share: float = 0.0,
    pending_share: float = 0.0,
    hard_share: float = 0.0,
    noise_share: float = 0.0,
) -> list[dict]:
    """Build one split: stratified (line, outcome, class) cells, fresh profiles, balanced phrasing families.

    Args:
        split: "train", "validation" or "test" (test also uses HELD_OUT_FAMILIES).
        size: number of records.
        seed: base seed; each split draws from its own `random.Random(f"{seed}-{split}")`.
        seen_profiles: profile ids used by earlier splits; updated in place so splits stay disjoint.
        extra_share: for the training split, the share of facts said in an extra form
            (`families.EXTRA_FORM_SHARE`); validation and test keep the usual forms.
        frame_share: for the training split, the share of facts said in an extra sentence
            (`families.EXTRA_FRAME_SHARE`); validation and test keep the usual ones.
        mix_share: for the training split, the share of facts said in another style's template or
            under another field name (`families.MIX_SHARE`); validation and test keep their own.
        near_share: for the training split, the share of openings that withhold only one fact per
            later broker turn (`families.NEAR_COMPLETE_SHARE`).
        pending_share: for the training split, the share of openings that name a withheld fact as
            pending (`families.PENDING_SHARE`).
        hard_share: for the training split, the share of dollar amounts said as bare digits or in words
            (`families.HARD_AMOUNT_SHARE`).
        noise_share: for the training split, the share of table and dump turns with rows the rulebook does
            not read (`families.NOISE_ROW_SHARE`).

    Returns:
        The records, in random order, with ids `<split>-0001`...

    Raises:
        RuntimeError: a cell could not be filled within MAX_SAMPLING_TRIES draws.
    """
    rng = random.Random(f"{seed}-{split}")
    train = split == "train"
    shares = (extra_share, frame_share, mix_share, near_share, pending_share, hard_share, noise_share)
    families.use_extra_forms(f"{seed}-{split}-extra", *(shares if train else (0.0,) * len(shares)))
    plan = []
    for lob, lob_count in allocate(size, dict.fromkeys(rulebook.LINES_OF_BUSINESS, 1)).items():
        for cell, cell_count in allocate(lob_count, CELL_SHARES).items():
            plan += [(lob, cell)] * cell_count
    rng.shuffle(plan)
    # The held-out family keeps a quarter of the test split (as when there were 3 seen families), so
    # the generalization figure rests on ~25 conversations, not 1/11 of them.
    held_out = round(size * HELD_OUT_SHARE) if split == "test" else 0
    family_plan = [HELD_OUT_FAMILIES[i % len(HELD_OUT_FAMILIES)] for i in range(held_out)]
    family_plan += [SEEN_FAMILIES[i % len(SEEN_FAMILIES)] for i in range(size - held_out)]
    rng.shuffle(family_plan)

    records = []
    for number, ((lob, cell), family) in enumerate(zip(plan, family_plan, strict=True), start=1):
        # Rejection sampling: draw cases until one lands in the planned (outcome, class) cell.
        for _ in range(MAX_SAMPLING_TRIES):
            facts = sample_facts(lob, rng)
            decision = rulebook.decide(lob, facts)
            profile_id = build_profile_id(lob, facts)
            if (decision["outcome"], decision["risk_class"]) == cell and profile_id not in seen_profiles:
                break
        else:
            raise RuntimeError(f"could not sample a {lob} case for {cell} in {MAX_SAMPLING_TRIES} tries")
        seen_profiles.add(profile_id)
        messages, ask_facts, corrected = build_conversation(lob, facts, decision, family, rng)
        records.append(
            {
                "id": f"{split}-{number:04d}",
                "line_of_business": lob,
                "profile_id": profile_id,
                "phrasing_family": family,
                "facts": facts,
                "messages": messages,
                "ask_facts": ask_facts,
                "corrected": corrected,
                "decision": decision,
            }
        )
    return records


def check_balance(split: str, records: list[dict]) -> None:
    """Fail loudly when an outcome exceeds 50% of a split or an outcome/line of business is missing.

    Raises:
        ValueError: naming the split and the offending counts.
    """
    outcomes = Counter(record["decision"]["outcome"] for record in records)
    lines = Counter(record["line_of_business"] for record in records)
    for outcome, count in outcomes.items():
        if count > len(records) / 2:
            raise ValueError(f"{split}: outcome {outcome} is {count}/{len(records)} records (> 50%): {dict(outcomes)}")
    absent = [o for o in rulebook.OUTCOMES if not outcomes[o]] + [b for b in rulebook.LINES_OF_BUSINESS if not lines[b]]
    if absent:
        raise ValueError(f"{split}: no records for {absent}")


def write_jsonl(path: Path, records: list[dict]) -> str:
    """Write records as sorted-key JSON lines and return the file's sha256."""
    text = "".join(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n" for record in records)
    path.write_text(text, encoding="utf-8", newline="\n")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def count_chars(record: dict) -> int:
    """Characters of all message contents of a record."""
    return sum(len(message["content"]) for message in record["messages"])


def measure_token_lengths(splits: dict[str, list[dict]], tokenizer_name: str) -> tuple[dict | None, str]:
    """Count the tokens of every conversation after the tokenizer's chat template.

    Args:
        splits: split name -> records.
        tokenizer_name: alias, folder or hub id for `common.model.load_tokenizer`.

    Returns:
        (split -> token counts, "") or, when the tokenizer cannot be imported or loaded,
        (None, reason): the data card is still written, with the reason instead of the stats.
    """
    try:
        from common.model import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_name)
        lengths = {
            split: [
                len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                for r in records
            ]
            for split, records in splits.items()
        }
    except Exception as exc:  # the card must be written even without a tokenizer
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]
    return lengths, ""


def summarize(values: list[float]) -> list[str]:
    """min / mean / p50 / p95 / max (nearest-rank percentiles) as table cells."""
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return [str(ordered[0]), f"{statistics.fmean(ordered):.1f}", str(rank(50)), str(rank(95)), str(ordered[-1])]


def markdown_table(header: list[str], rows: list[list]) -> str:
    """Render a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(count: int, total: int) -> str:
    """Format a count with its share, e.g. "12 (40.0%)"."""
    return f"{count} ({100 * count / total:.1f}%)"


def split_stat_rows(splits: dict) -> tuple[list, list, list, list, list]:
    """The data card's per-split tables: outcomes, risk classes, outcomes per line, families, shapes.

    Args:
        splits: split name -> records.

    Returns:
        (outcome_rows, class_rows, lob_rows, family_rows, shape_rows), rows for `markdown_table`.
    """
    outcome_rows, class_rows, lob_rows, family_rows, shape_rows = [], [], [], [], []
    for split, records in splits.items():
        n = len(records)
        outcomes = Counter(r["decision"]["outcome"] for r in records)
        classes = Counter(r["decision"]["risk_class"] for r in records)
        majority = max(outcomes.values()) / n
        outcome_rows.append([split, n, *(percent(outcomes[o], n) for o in rulebook.OUTCOMES), f"{majority:.3f}"])
        class_rows.append([split, *(percent(classes[c], n) for c in rulebook.RISK_CLASSES)])
        for lob in rulebook.LINES_OF_BUSINESS:
            by_lob = Counter(r["decision"]["outcome"] for r in records if r["line_of_business"] == lob)
            lob_rows.append([split, lob, sum(by_lob.values()), *(by_lob[o] for o in rulebook.OUTCOMES)])
        families = Counter(r["phrasing_family"] for r in records)
        family_rows.append([split, *(families[f] for f in SEEN_FAMILIES + HELD_OUT_FAMILIES)])
        turns = Counter(sum(m["role"] == "user" for m in r["messages"]) for r in records)
        shape_rows.append(
            [split, *(turns[t] for t in USER_TURN_WEIGHTS), *summarize([count_chars(r) for r in records])]
        )
    return outcome_rows, class_rows, lob_rows, family_rows, shape_rows


def family_examples_section(splits: dict) -> str:
    """The data card's examples: the broker turns of one conversation per phrasing family."""
    blocks = []
    for family in SEEN_FAMILIES + HELD_OUT_FAMILIES:
        record = next(r for records in splits.values() for r in records if r["phrasing_family"] == family)
        turns = [m["content"] for m in record["messages"] if m["role"] == "user"]
        text = "\n---\n".join(turns)
        note = f", corrected: {record['corrected']}" if record["corrected"] else ""
        blocks.append(
            f"`{family}` ({record['id']}{note}):\n\n" + "\n".join("    " + line for line in text.splitlines())
        )
    return "\n\n".join(blocks)


def token_length_section(tokens: tuple[dict | None, str], tokenizer_name: str) -> str:
    """The data card's token-length table, or the reason it is missing."""
    lengths, reason = tokens
    if lengths is None:
        return f"token stats unavailable: {reason}"
    token_rows = [[split, *summarize(values)] for split, values in lengths.items()]
    return (
        f"Tokens of the whole conversation after `apply_chat_template` with `{tokenizer_name}`:\n\n"
        + markdown_table(["split", "min", "mean", "p50", "p95", "max"], token_rows)
    )


def card_introduction(seed: int, train_seed: int | None = None) -> str:
    """The data card's text up to the rulebook: what the data is, the worksheet, how to regenerate, the format."""
    return f"""# Underwriting conversations (synthetic)

Short chat conversations between an insurance broker (user) and an underwriting assistant, for
LoRA finetuning. The broker presents a term life, homeowners or small-business property
submission with some or all of the facts; the assistant asks for exactly the missing ones (1-4 user
turns in all: one when the submission is complete), each asking turn first writing the facts so far
with "?" where one is missing (`Facts: age 71; face ?; BMI ?; smoker yes; ...`, a fact said wrong
keeps its wrong value until the broker corrects it); the last assistant turn works the case out on a
short worksheet and ends with one machine-readable line:

    Facts: born 1971; face $1500k; BMI 31.2; smoker no; medical history none; occupation nurse, not hazardous.
    L-1 born 1971 < 1955 no
    L-2 medical history none = serious no
    L-3 BMI 31.2 >= 40 no
    L-4 born 1971 <= 1975 yes, face $1500k > $1000k yes: refer -> refer L-4
    ... (one line per rule)
    L-8 BMI 31.2 >= 30 yes, BMI 31.2 < 40 yes: standard -> refer L-4, L-8
    L-9 medical history none = controlled no
    Refer to a senior underwriter.
    DECISION: refer | CLASS: n/a | RULES: L-4, L-8

Why a worksheet: a 135M-parameter model cannot make the whole rulebook decision in the tokens of
one line. Restating every fact once, in the rulebook's order and units (dollars in thousands),
then writing each rule's comparison next to its yes/no, turns the decision into short local
steps: copy a number, compare it with the threshold beside it. Every comparison gets its own
yes/no, a lone one too (a model that wrote only the rule's answer after a lone comparison got 16%
of them wrong, against under 1% of the parts of multi-part rules); a categorical fact is copied
beside the value the rule wants ("wind zone inland = coastal no") instead of being looked up in
the Facts line; H-3 and H-7 first write the roof limit of the construction ("frame limit 20"),
and B-4 works out 5 x revenue before comparing it with the TIV. An age the broker gave as a year
stays a year and is compared with the limit as a year ("born 1971 < 1955" is "age 54 > 70"), so no
step needs a subtraction (a model asked to write "2025-1998=27" got the difference wrong most of
the time).
Rules are numbered from most to least severe, so the outcome is the effect of the first fired
rule. A rule that fires ends its line with its effect and, after "->", the running result (that
first effect and every rule fired so far), so the decision is built one line at a time instead of
by collecting the yeses at the end (a model trained with a separate "Fired:" line listed its own
yeses right in 4 of 60 validation replies); the last "->" is the decision. A rule that does not
fire ends after its comparisons: the result is written only where it changes (worksheet v5: the
same steps in 13% fewer trained tokens than v4's `: no -> refer L-4` on every line, for the token
budget). Every rule's yes/no comes from its predicate in `data/rulebook.py`, so `decide()` stays
the only source of labels.

Everything is generated from seeded templates: the data tests rule-following and fact gathering,
not real-world underwriting. Years ("born 1983") are read as of {rulebook.REFERENCE_YEAR}.

## Regenerate

    python data/generate.py            # seed {seed}: train/validation/test .jsonl + this card{
        "" if train_seed is None else f" (--train-seed {train_seed}: the training split drawn with seed {train_seed})"
    }
    python data/generate.py --seed 7 --output-dir /tmp/uw --no-token-stats

The same seed gives byte-identical files (see the sha256 below).

## Record format

One JSON object per line: `id`, `line_of_business`, `profile_id` (hash of the facts),
`phrasing_family`, `facts` (every fact the rulebook reads), `corrected` ({{fact: the wrong value
the broker said first}} when a later turn corrects it, else {{}}), `messages` (system, then alternating
user/assistant, ending with the assistant), `decision` (`outcome`, `risk_class`, `rules`,
`conditions`), and `ask_facts`: for each asking assistant turn, the facts (keys of `facts`) still
missing there, which that turn asks for by the names in `data/task.py::FACT_ASK_NAMES`
(evaluate.py scores generated asking turns against it). `rulebook.decide(line_of_business, facts)
== decision` for every record.

"""


def extra_forms_sentence(share: float) -> str:
    """The data card's sentence on the training split's extra forms; empty when they are off."""
    if share <= 0:
        return ""
    return f""" In the training split only, {round(100 * share)}% of the numbers, counts and flags
are said in an extra form (augmentation: a decimal comma "6,5 miles", "1.250.000 USD", "$ 410,000.00",
"six point five miles", "clean loss run", "elec original"), drawn from a generator of their own so the
rest of the split is unchanged; validation and test keep the usual forms."""


def extra_frames_sentence(share: float) -> str:
    """The data card's sentence on the training split's extra frames; empty when they are off."""
    if share <= 0:
        return ""
    return f""" In the training split only, {round(100 * share)}% of the facts of the sentence families
are said in another sentence around them (augmentation, `families.EXTRA_FRAMES`: "he turned 51 this year",
"they gross around $640k annually", "the tenant is a bakery"), from a generator of their own; the
assistant turns and the other splits are unchanged."""


def mixed_styles_sentence(share: float) -> str:
    """The data card's sentence on the training split's mixed styles; empty when they are off."""
    if share <= 0:
        return ""
    return f""" In the training split only, {round(100 * share)}% of the facts are said with another
style's words ("NS" in an email, "the applicant does not smoke" in shorthand) or, in tables and dumps,
under another field name (`families.MIX_LABELS`: "yob", "cov_a", "fs_mi"), from a generator of their own."""


def submission_shape_sentence(near: float, pending: float) -> str:
    """The data card's sentence on the training split's near-complete openings and pending facts; empty when off."""
    parts = []
    if near > 0:
        parts.append(
            f"{round(100 * near)}% of the openings followed by asking turns withhold only one fact per later broker turn"
        )
    if pending > 0:
        parts.append(
            f'{round(100 * pending)}% name a withheld fact as still to come ("roof age to follow", a row "TBD")'
        )
    if not parts:
        return ""
    return f""" In the training split only, {" and ".join(parts)}, as brokers send
submissions (`families.NEAR_COMPLETE_SHARE`, `families.PENDING_SHARE`); the other splits are unchanged."""


def hard_amounts_sentence(share: float) -> str:
    """The data card's sentence on the training split's hard amounts; empty when off."""
    if share <= 0:
        return ""
    return f""" In the training split only, {round(100 * share)}% of the dollar amounts are said as bare
digits ("USD 11700000", "$1850000") or in words ("six hundred twenty-five thousand"), the forms the model
read worst (`families.HARD_AMOUNT_SHARE`), from a generator of their own."""


def noise_rows_sentence(share: float) -> str:
    """The data card's sentence on the training split's noise rows; empty when off."""
    if share <= 0:
        return ""
    return f""" In the training split only, {round(100 * share)}% of the table and dump turns carry 1-3
rows the rulebook does not read ("Stories 2", "Premium est $1,843.20", "payroll=$819,000"), from a generator
of their own (`families.NOISE_ROWS`)."""


def write_data_card(
    path: Path,
    splits: dict,
    hashes: dict,
    seed: int,
    tokens: tuple[dict | None, str],
    tokenizer_name: str,
    extra_share: float = families.EXTRA_FORM_SHARE,
    frame_share: float = families.EXTRA_FRAME_SHARE,
    mix_share: float = families.MIX_SHARE,
    train_seed: int | None = None,
    near_share: float = families.NEAR_COMPLETE_SHARE,
    pending_share: float = families.PENDING_SHARE,
    hard_share: float = families.HARD_AMOUNT_SHARE,
    noise_share: float = families.NOISE_ROW_SHARE,
) -> None:
    """Write the data card; the rule table comes from the rulebook so the card never drifts from it.

    Args:
        path: where to write (data/README.md by default).
        splits: split name -> records.
        hashes: split name -> sha256 of its file.
        seed: the generation seed.
        tokens: `measure_token_lengths` output, or (None, reason).
        tokenizer_name: the tokenizer the token counts are for.
        extra_share: the training split's share of facts said in an extra form.
        frame_share: the training split's share of facts said in an extra frame.
        mix_share: the training split's share of facts said in another style or field name.
        train_seed: the seed the training split was drawn with, when not `seed` (`--train-seed`).
        near_share: the training split's share of near-complete openings.
        pending_share: the training split's share of openings naming a withheld fact as pending.
        hard_share: the training split's share of dollar amounts said as bare digits or in words.
        noise_share: the training split's share of table and dump turns with rows the rulebook does not read.
    """
    rule_rows = [
        [rule.rule_id, lob, rule.effect, rule.condition or "", rule.description]
        for lob, rules in rulebook.RULES.items()
        for rule in rules
    ]
    outcome_rows, class_rows, lob_rows, family_rows, shape_rows = split_stat_rows(splits)
    token_section = token_length_section(tokens, tokenizer_name)
    card = (
        card_introduction(seed, train_seed)
        + f"""## Rulebook

A decline rule firing means decline; else a refer rule means refer (class `n/a`); else approve
at the worst class a fired rule caps it to, with the conditions of the fired rules. When no
rule fires, the line's grant rule fires (preferred). RULES lists every fired rule, by number.

{markdown_table(["rule", "line of business", "effect", "condition on approval", "description"], rule_rows)}

## Splits

Profiles (fact sets) are disjoint across splits. The test split adds the phrasing family
`{", ".join(HELD_OUT_FAMILIES)}` ({round(100 * HELD_OUT_SHARE)}% of it), which train and validation never show.

{markdown_table(["split", "file", "sha256"], [[s, f"{s}.jsonl", hashes[s]] for s in splits])}

### Outcomes (majority-class accuracy = share of the most common outcome)

{markdown_table(["split", "records", *rulebook.OUTCOMES, "majority-class accuracy"], outcome_rows)}

### Risk classes

{markdown_table(["split", *rulebook.RISK_CLASSES], class_rows)}

### Outcomes per line of business

{markdown_table(["split", "line of business", "records", *rulebook.OUTCOMES], lob_rows)}

### Phrasing families

{markdown_table(["split", *SEEN_FAMILIES, *HELD_OUT_FAMILIES], family_rows)}

### One example per family (broker turns, "---" between turns)

Every family varies inside too: money as $1,250,000 / 1.25M / 1250k / words, ages as years or a
birth year, feet and miles in several spellings, claims counted or listed by year (often with a
year outside the five-year window, which does not count), other words for a category ("RN",
"brick", "cabinet shop"; the worksheet writes the rulebook's name and an occupancy's hazard class
from the rulebook, the broker says the class only sometimes), and in {round(100 * CORRECTION_SHARE)}% of the
conversations with a later broker turn a fact said wrong in the opening and corrected in a later
turn (`corrected` holds the wrong value; `facts`, the worksheet and the decision use the corrected one). Long emails, forwarded
tables, call logs and team chats carry numbers that are not facts (phones, dates, street and
policy numbers).{extra_forms_sentence(extra_share)}{extra_frames_sentence(frame_share)}{mixed_styles_sentence(mix_share)}{submission_shape_sentence(near_share, pending_share)}{hard_amounts_sentence(hard_share)}{noise_rows_sentence(noise_share)} See `data/families.py`.

{family_examples_section(splits)}

### Conversation shape (user turns; characters of all messages)

{markdown_table(["split", *(f"{t} user turns" for t in USER_TURN_WEIGHTS), "chars min", "mean", "p50", "p95", "max"], shape_rows)}

### Token lengths

{token_section}
"""
    )
    # The hand-written stress split's section is not generated: keep it from the card being replaced.
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    stress = old[old.index(STRESS_HEADING) :] if STRESS_HEADING in old else ""
    path.write_text(card + ("\n" + stress if stress else ""), encoding="utf-8", newline="\n")


STRESS_HEADING = "## Stress split (hand-written)"


def main(argv: list[str] | None = None) -> None:
    """Generate the three splits and the data card."""
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    seen_profiles: set[str] = set()
    splits = {}
    for split in SPLITS:
        splits[split] = build_split(
            split,
            getattr(args, f"{split}_size"),
            args.train_seed if split == "train" and args.train_seed is not None else args.seed,
            seen_profiles,
            args.extra_forms,
            args.extra_frames,
            args.mixed_styles,
            args.near_complete,
            args.pending,
            args.hard_amounts,
            args.noise_rows,
        )
        check_balance(split, splits[split])

    hashes = {split: write_jsonl(args.output_dir / f"{split}.jsonl", records) for split, records in splits.items()}
    if args.no_token_stats:
        tokens = (None, "skipped (--no-token-stats)")
    else:
        tokens = measure_token_lengths(splits, args.tokenizer)
    write_data_card(
        args.output_dir / "README.md",
        splits,
        hashes,
        args.seed,
        tokens,
        args.tokenizer,
        args.extra_forms,
        args.extra_frames,
        args.mixed_styles,
        args.train_seed,
        args.near_complete,
        args.pending,
        args.hard_amounts,
        args.noise_rows,
    )
    for split, records in splits.items():
        print(f"wrote {args.output_dir / f'{split}.jsonl'}: {len(records)} records, sha256 {hashes[split][:12]}")
    print(f"wrote {args.output_dir / 'README.md'}")


if __name__ == "__main__":
    main()
