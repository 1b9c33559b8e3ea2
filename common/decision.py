"""The machine-readable line that ends every underwriting reply, written and read back.

    DECISION: approve | CLASS: preferred | RULES: L-3, L-7

The dataset generator writes it with `format_decision_line` (strict); evaluation reads a model's
reply with `parse_decision_line` (lenient about case and spacing, takes the last matching line).

    python -c "from common.decision import parse_decision_line as p; \
print(p('Refer it.\\ndecision: REFER | class: n/a | rules: h-3'))"
"""

from __future__ import annotations

import re

OUTCOMES = ("approve", "refer", "decline")
RISK_CLASSES = ("preferred", "standard", "substandard", "n/a")

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
# What the assistant calls each fact when it asks for it (the dataset writes these words; evaluation
# reads them back to score the asking turns).
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


def format_decision_line(outcome: str, risk_class: str, rules: list[str]) -> str:
    """Write the decision line.

    Args:
        outcome: approve, refer or decline.
        risk_class: preferred, standard or substandard for an approval; "n/a" otherwise.
        rules: the rule ids applied, e.g. ["L-3", "L-7"], in the order to print them.

    Returns:
        e.g. "DECISION: approve | CLASS: preferred | RULES: L-3, L-7".

    Raises:
        ValueError: unknown outcome or class, a class that does not fit the outcome, no rules,
            or a malformed rule id.
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
    """Find the last well-formed decision line in a reply.

    Case and whitespace are ignored ("decision : Approve|class:STANDARD|rules: l-8"), and a
    trailing period is allowed. The class is not checked against the outcome, so a reply with
    the right outcome but an inconsistent class can still be scored on its outcome.

    Args:
        text: the assistant reply (any number of lines).

    Returns:
        {"outcome": str, "risk_class": str, "rules": [str, ...]} normalized to lowercase
        outcome/class and "L-3"-style rule ids, or None when no line has the format (a field
        missing, an unknown outcome or class, an empty or malformed rule list).
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
    """Read the approval conditions a reply names in its outcome sentence.

    Args:
        text: the assistant reply (any number of lines).

    Returns:
        The conditions of the last "Condition: ..." / "Subject to: ..." phrase, lowercased and split
        on ";" (e.g. ["roof inspection within 30 days"]); [] when the reply names none.
    """
    matches = CONDITION_PHRASE.findall(text)
    if not matches:
        return []
    return [part.strip().lower() for part in matches[-1].split(";") if part.strip()]


def parse_asked_facts(text: str) -> set[str]:
    """The facts a reply asks for, by the names the dataset's assistant uses for them.

    Args:
        text: an assistant reply, e.g. "Thanks. I still need the BMI and smoking status.".

    Returns:
        The fact keys named (e.g. {"bmi", "smoker"}); matching ignores case. Empty when the reply
        names none (a decision, a refusal, small talk).
    """
    lowered = text.lower()
    return {key for key, name in FACT_ASK_NAMES.items() if name.lower() in lowered}
