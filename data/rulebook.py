"""The underwriting rulebook behind the synthetic dataset: one table of rules, one `decide()`.

Each rule has an id (L- term life, H- homeowners, B- small-business property), an effect, a
one-sentence description, and a predicate on the case facts. `decide()` applies the rules of
one line of business like this:

1. every rule whose predicate holds "fires";
2. any decline rule fired -> decline; otherwise any refer rule fired -> refer (to a senior
   underwriter); both get risk class "n/a" and no conditions;
3. otherwise approve, at the worst class a fired rule caps it to (substandard < standard);
   when no rule fires at all, the line's grant rule fires and the class is preferred;
4. the decision cites every fired rule, sorted by rule number, and (approvals only) the
   conditions attached to the fired rules.

Years in a submission ("born 1983", "roof replaced 2007") are converted to ages as of
REFERENCE_YEAR. Try it:

    python -c "from data.rulebook import decide; print(decide('term_life', {'age': 55, \
'face_amount': 1_500_000, 'bmi': 27.0, 'smoker': False, 'medical_history': 'none', \
'occupation': 'teacher'}))"
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REFERENCE_YEAR = 2025
LINES_OF_BUSINESS = ("term_life", "homeowners", "small_business_property")
OUTCOMES = ("approve", "refer", "decline")
RISK_CLASSES = ("preferred", "standard", "substandard", "n/a")
# Effects from most to least severe; an approval takes the class of its most severe cap.
EFFECTS = ("decline", "refer", "substandard", "standard", "preferred")

# --- lookup tables the rules use ---
# Term life occupations: True marks a hazardous occupation (rule L-7).
LIFE_OCCUPATIONS = {
    "teacher": False,
    "accountant": False,
    "nurse": False,
    "software developer": False,
    "retail manager": False,
    "pharmacist": False,
    "graphic designer": False,
    "commercial diver": True,
    "offshore rig worker": True,
    "logger": True,
    "commercial fisher": True,
    "tower crane operator": True,
}
MEDICAL_HISTORIES = ("none", "controlled", "serious")
CONSTRUCTION_TYPES = ("frame", "masonry", "fire_resistive")
WIND_ZONES = ("inland", "coastal")
# Small-business occupancies and their fire-hazard class (rules B-1, B-5, B-8).
OCCUPANCY_HAZARD = {
    "accounting office": "low",
    "dental clinic": "low",
    "clothing boutique": "low",
    "insurance agency": "low",
    "bookstore": "low",
    "restaurant": "moderate",
    "bakery": "moderate",
    "auto repair shop": "moderate",
    "dry cleaner": "moderate",
    "print shop": "moderate",
    "woodworking shop": "high",
    "furniture refinisher": "high",
    "plastics molder": "high",
    "spray-paint shop": "high",
}

# The facts each line of business needs; `decide()` refuses a case that lacks one.
REQUIRED_FACTS = {
    "term_life": ("age", "face_amount", "bmi", "smoker", "medical_history", "occupation"),
    "homeowners": (
        "construction",
        "roof_age",
        "fire_station_miles",
        "hydrant_feet",
        "prior_claims",
        "wind_zone",
        "dwelling_value",
    ),
    "small_business_property": (
        "occupancy",
        "sprinklered",
        "building_age",
        "wiring_updated",
        "annual_revenue",
        "tiv",
        "prior_losses",
    ),
}


@dataclass(frozen=True)
class Rule:
    """One underwriting rule: a row of the rulebook table.

    Attributes:
        rule_id: "L-3", "H-7", ... (the letter names the line of business).
        effect: one of EFFECTS.
        description: the rule in one sentence (copied into the data card).
        applies: predicate on the facts; None for the grant rule, which fires when nothing else does.
        reason: short rationale for the assistant's reply, filled in from the facts.
        condition: condition attached to an approval when the rule fires, if any.
    """

    rule_id: str
    effect: str
    description: str
    applies: Callable[[dict], bool] | None
    reason: Callable[[dict], str]
    condition: str | None = None


def format_money(amount: int) -> str:
    """Format dollars the way the assistant writes them, e.g. 1500000 -> "$1,500,000"."""
    return f"${amount:,}"


def roof_age_limit(construction: str) -> int:
    """Return the oldest roof (years) accepted without referral for a construction type (H-3)."""
    return 20 if construction == "frame" else 25


def is_partially_protected(facts: dict) -> bool:
    """Return True when exactly one of the two fire-protection limits is exceeded (H-8)."""
    far_station = facts["fire_station_miles"] > 5
    far_hydrant = facts["hydrant_feet"] > 1000
    return far_station != far_hydrant


LIFE_RULES = (
    Rule(
        "L-1",
        "decline",
        "Applicants older than 70 are outside term life eligibility and are declined.",
        lambda f: f["age"] > 70,
        lambda f: f"age {f['age']} is over 70",
    ),
    Rule(
        "L-2",
        "decline",
        "A serious medical history (heart attack, stroke or cancer in the last 5 years) is declined.",
        lambda f: f["medical_history"] == "serious",
        lambda f: "serious condition within 5 years",
    ),
    Rule(
        "L-3",
        "decline",
        "A BMI of 40 or more is declined.",
        lambda f: f["bmi"] >= 40,
        lambda f: f"BMI {f['bmi']} is 40 or more",
    ),
    Rule(
        "L-4",
        "refer",
        "A face amount above $1,000,000 for an applicant aged 50 or older is referred.",
        lambda f: f["age"] >= 50 and f["face_amount"] > 1_000_000,
        lambda f: f"{format_money(f['face_amount'])} face at age {f['age']}",
    ),
    Rule(
        "L-5",
        "refer",
        "A smoker with a BMI of 35 or more is referred.",
        lambda f: f["smoker"] and f["bmi"] >= 35,
        lambda f: f"smoker with BMI {f['bmi']}",
    ),
    Rule(
        "L-6",
        "substandard",
        "Any tobacco use caps the class at substandard.",
        lambda f: f["smoker"],
        lambda f: "tobacco use",
    ),
    Rule(
        "L-7",
        "substandard",
        "A hazardous occupation caps the class at substandard and adds an exclusion rider.",
        lambda f: LIFE_OCCUPATIONS[f["occupation"]],
        lambda f: f"hazardous occupation: {f['occupation']}",
        condition="hazardous-activity exclusion rider",
    ),
    Rule(
        "L-8",
        "standard",
        "A BMI from 30.0 to 39.9 caps the class at standard.",
        lambda f: 30 <= f["bmi"] < 40,
        lambda f: f"BMI {f['bmi']} in the 30-39.9 band",
    ),
    Rule(
        "L-9",
        "standard",
        "A controlled chronic condition caps the class at standard and needs a physician statement.",
        lambda f: f["medical_history"] == "controlled",
        lambda f: "controlled chronic condition",
        condition="attending physician statement before issue",
    ),
    Rule(
        "L-10",
        "preferred",
        "Preferred class is granted when none of L-1 to L-9 applies.",
        None,
        lambda f: "no adverse rule applies",
    ),
)

HOMEOWNERS_RULES = (
    Rule(
        "H-1",
        "decline",
        "Three or more claims in the last 5 years are declined.",
        lambda f: f["prior_claims"] >= 3,
        lambda f: f"{f['prior_claims']} claims in 5 years",
    ),
    Rule(
        "H-2",
        "decline",
        "A home more than 5 miles from a fire station AND more than 1,000 ft from a hydrant is "
        "unprotected and declined.",
        lambda f: f["fire_station_miles"] > 5 and f["hydrant_feet"] > 1000,
        lambda f: f"unprotected: {f['fire_station_miles']} mi to station, {f['hydrant_feet']} ft to hydrant",
    ),
    Rule(
        "H-3",
        "refer",
        "A roof older than 20 years on a frame home, or older than 25 years on masonry or "
        "fire-resistive construction, is referred.",
        lambda f: f["roof_age"] > roof_age_limit(f["construction"]),
        lambda f: f"{f['roof_age']}-year roof on {f['construction'].replace('_', '-')} construction",
    ),
    Rule(
        "H-4",
        "refer",
        "A dwelling value above $1,000,000 in the coastal wind zone is referred.",
        lambda f: f["wind_zone"] == "coastal" and f["dwelling_value"] > 1_000_000,
        lambda f: f"{format_money(f['dwelling_value'])} dwelling in the coastal wind zone",
    ),
    Rule(
        "H-5",
        "substandard",
        "Exactly two claims in the last 5 years cap the class at substandard.",
        lambda f: f["prior_claims"] == 2,
        lambda f: "two claims in 5 years",
    ),
    Rule(
        "H-6",
        "substandard",
        "A home in the coastal wind zone is capped at substandard with a 5% named-storm deductible.",
        lambda f: f["wind_zone"] == "coastal",
        lambda f: "coastal wind zone",
        condition="5% named-storm deductible",
    ),
    Rule(
        "H-7",
        "standard",
        "A roof 15 years or older (within its H-3 limit) caps the class at standard and needs an inspection.",
        lambda f: 15 <= f["roof_age"] <= roof_age_limit(f["construction"]),
        lambda f: f"{f['roof_age']}-year-old roof",
        condition="roof inspection within 30 days",
    ),
    Rule(
        "H-8",
        "standard",
        "A home more than 5 miles from a fire station OR more than 1,000 ft from a hydrant (not "
        "both) caps the class at standard.",
        is_partially_protected,
        lambda f: "partial fire protection",
    ),
    Rule(
        "H-9",
        "preferred",
        "Preferred class is granted when none of H-1 to H-8 applies.",
        None,
        lambda f: "no adverse rule applies",
    ),
)

BUSINESS_RULES = (
    Rule(
        "B-1",
        "decline",
        "A high-hazard occupancy without sprinklers is declined.",
        lambda f: OCCUPANCY_HAZARD[f["occupancy"]] == "high" and not f["sprinklered"],
        lambda f: f"unsprinklered high-hazard {f['occupancy']}",
    ),
    Rule(
        "B-2",
        "decline",
        "Three or more property losses in the last 5 years are declined.",
        lambda f: f["prior_losses"] >= 3,
        lambda f: f"{f['prior_losses']} losses in 5 years",
    ),
    Rule(
        "B-3",
        "refer",
        "A building older than 50 years whose wiring was never updated is referred.",
        lambda f: f["building_age"] > 50 and not f["wiring_updated"],
        lambda f: f"{f['building_age']}-year-old building with original wiring",
    ),
    Rule(
        "B-4",
        "refer",
        "A total insured value above 5 times annual revenue is referred.",
        lambda f: f["tiv"] > 5 * f["annual_revenue"],
        lambda f: f"TIV {format_money(f['tiv'])} over 5x revenue {format_money(f['annual_revenue'])}",
    ),
    Rule(
        "B-5",
        "substandard",
        "A sprinklered high-hazard occupancy caps the class at substandard.",
        lambda f: OCCUPANCY_HAZARD[f["occupancy"]] == "high" and f["sprinklered"],
        lambda f: f"high-hazard {f['occupancy']}, sprinklered",
    ),
    Rule(
        "B-6",
        "substandard",
        "Exactly two property losses in the last 5 years cap the class at substandard.",
        lambda f: f["prior_losses"] == 2,
        lambda f: "two losses in 5 years",
    ),
    Rule(
        "B-7",
        "standard",
        "A building 31 to 50 years old with original wiring caps the class at standard and needs an "
        "electrical inspection.",
        lambda f: 30 < f["building_age"] <= 50 and not f["wiring_updated"],
        lambda f: f"{f['building_age']}-year-old building with original wiring",
        condition="electrical inspection within 60 days",
    ),
    Rule(
        "B-8",
        "standard",
        "A moderate-hazard occupancy without sprinklers caps the class at standard and needs an "
        "extinguisher certificate.",
        lambda f: OCCUPANCY_HAZARD[f["occupancy"]] == "moderate" and not f["sprinklered"],
        lambda f: f"unsprinklered moderate-hazard {f['occupancy']}",
        condition="fire extinguisher service certificate within 30 days",
    ),
    Rule(
        "B-9",
        "preferred",
        "Preferred class is granted when none of B-1 to B-8 applies.",
        None,
        lambda f: "no adverse rule applies",
    ),
)

RULES = {
    "term_life": LIFE_RULES,
    "homeowners": HOMEOWNERS_RULES,
    "small_business_property": BUSINESS_RULES,
}


def rule_sort_key(rule_id: str) -> tuple[str, int]:
    """Sort key that puts "L-2" before "L-10" (by letter, then by number)."""
    letter, number = rule_id.split("-")
    return letter, int(number)


def get_rule(rule_id: str) -> Rule:
    """Return the rule with this id.

    Args:
        rule_id: e.g. "H-3".

    Returns:
        The matching Rule.

    Raises:
        KeyError: no rule has this id.
    """
    for rules in RULES.values():
        for rule in rules:
            if rule.rule_id == rule_id:
                return rule
    raise KeyError(f"unknown rule id {rule_id!r}")


def find_fired_rules(line_of_business: str, facts: dict) -> list[Rule]:
    """Return the rules of a line that fire on these facts (the grant rule when nothing else does).

    Args:
        line_of_business: one of LINES_OF_BUSINESS.
        facts: the case facts; must contain every key of REQUIRED_FACTS[line_of_business].

    Returns:
        The fired rules, sorted by rule number; never empty.

    Raises:
        ValueError: unknown line of business, a missing fact, or an unknown occupation/occupancy.
    """
    if line_of_business not in RULES:
        raise ValueError(f"unknown line of business {line_of_business!r}; use one of {LINES_OF_BUSINESS}")
    missing = [key for key in REQUIRED_FACTS[line_of_business] if key not in facts]
    if missing:
        raise ValueError(f"{line_of_business} case is missing facts: {', '.join(missing)}")
    if line_of_business == "term_life" and facts["occupation"] not in LIFE_OCCUPATIONS:
        raise ValueError(f"unknown occupation {facts['occupation']!r}; add it to LIFE_OCCUPATIONS")
    if line_of_business == "small_business_property" and facts["occupancy"] not in OCCUPANCY_HAZARD:
        raise ValueError(f"unknown occupancy {facts['occupancy']!r}; add it to OCCUPANCY_HAZARD")

    rules = RULES[line_of_business]
    fired = [rule for rule in rules if rule.applies is not None and rule.applies(facts)]
    if not fired:
        fired = [rule for rule in rules if rule.effect == "preferred"]
    return sorted(fired, key=lambda rule: rule_sort_key(rule.rule_id))


def decide(line_of_business: str, facts: dict) -> dict:
    """Decide a case from its facts.

    Args:
        line_of_business: one of LINES_OF_BUSINESS.
        facts: the case facts (see REQUIRED_FACTS).

    Returns:
        {"outcome": approve|refer|decline, "risk_class": preferred|standard|substandard|n/a,
         "rules": fired rule ids sorted by number, "conditions": approval conditions (else [])}.

    Raises:
        ValueError: see `find_fired_rules`.
    """
    fired = find_fired_rules(line_of_business, facts)
    worst = min((rule.effect for rule in fired), key=EFFECTS.index)
    if worst in ("decline", "refer"):
        outcome, risk_class, conditions = worst, "n/a", []
    else:
        outcome, risk_class = "approve", worst
        conditions = [rule.condition for rule in fired if rule.condition]
    return {
        "outcome": outcome,
        "risk_class": risk_class,
        "rules": [rule.rule_id for rule in fired],
        "conditions": conditions,
    }
