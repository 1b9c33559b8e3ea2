"""Tests of the broker phrasing families: every fact a turn claims to carry can be read back.

The reader below is written apart from data/families.py's renderers: it knows the surface forms a
person would write (money as $/k/M/commas/words, ages as years or birth years, feet and miles in
several spellings, claims counted or listed by year) and reads the facts back from the user turns.
Where a fact is said twice (a correction), the later mention wins.

python -m pytest -q tests/test_families.py
"""

import json
import random
import re
from pathlib import Path

import pytest

from data import families, generate, rulebook, worksheet_errors
from data.task import parse_conditions

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
YEAR = 2025  # ages and claim windows as of this year (the rulebook's reference year)
PER_FAMILY = 30  # conversations per family and line of business
EXTRA_SHARE = 0.3  # extra forms in the generated records (generate.py's default is 0: off)
FRAME_SHARE = 0.3  # extra frames around a fact, the same way
MIX_SHARE = 0.3  # another style's words or field name for a fact, the same way
NEAR_SHARE = 0.3  # openings that withhold one fact per later turn (`--near-complete`)
PENDING_SHARE = 0.3  # openings that name a withheld fact as pending (`--pending`): the reader reads no value there
HARD_SHARE = 0.3  # dollar amounts as bare digits or in words (`--hard-amounts`)
NOISE_SHARE = 0.3  # tables and dumps with rows the rulebook does not read (`--noise-rows`): the reader skips them
# Fields a form carries that no rule reads, as a reader would skip them: a table row, a key=value or "KEY: value"
# line, or a JSON entry.
NOISE_FIELD = (
    r"(?:stories|prot\. class|prot_class|sq[ _]ft|premium[ _]est|deductible|year purchased|purchase_yr|bedrooms"
    r"|term|term_yrs|beneficiary|annual income|income|premium[ _]mode|height|height_in|policy #|policy_no"
    r"|employees|years in business|yrs_in_business|payroll)"
)
NOISE_ROW = re.compile(
    rf'^\|? ?{NOISE_FIELD}(?:\s{{2,}}|\s*\|\s*|=|: )[^\n]*\n?|"{NOISE_FIELD}": "[^"]*",? ?', re.MULTILINE
)
PENDING_WORDS = re.compile(r"to follow|pending|\btbd\b|waiting on|once i have", re.IGNORECASE)
# What a reader takes a pending mention to be about: a fact's name or field label.
FACT_NAMES = {
    "age": r"\bage\b|birth|dob", "face_amount": r"face|coverage amount|sum assured", "bmi": r"bmi|height|weight",
    "smoker": r"smok|tobacco", "medical_history": r"medical|med_hx|health", "occupation": r"occupation|job",
    "construction": r"construction", "roof_age": r"roof", "fire_station_miles": r"fire.station|fire protection",
    "hydrant_feet": r"hydrant", "prior_claims": r"claim|loss", "wind_zone": r"wind", "dwelling_value": r"dwelling|coverage a",
    "occupancy": r"occupancy|business", "sprinklered": r"sprinkler", "building_age": r"built|building age|bldg",
    "wiring_updated": r"wiring|electric", "annual_revenue": r"revenue", "tiv": r"\btiv\b|total insured",
    "prior_losses": r"loss",
}  # fmt: skip

# --- an independent reader of broker text ---
GAP = r'[ :=|"\t]'  # between a label and its value on one line: "Age | 70", "age=70", '"age": "70"'
SEP = GAP + "{1,30}"
SPAN = r"(?:(?!\. | and )[^\d\n,;]){0,40}?"  # words between a keyword and its number, within one clause
WORD_VALUES = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}  # fmt: skip
WORD_NUMBER = "(?:" + "|".join(WORD_VALUES) + "|hundred|thousand|million)"
IDIOMS = {
    "three quarters of a million": 750_000,
    "a quarter million": 250_000,
    "half a million": 500_000,
    "one million": 1_000_000,
    "two million": 2_000_000,
}
COUNT_WORDS = {"no": 0, "nil": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
# Other words people use for a category, as a reader would list them (the canonical name matches too).
OTHER_NAMES = {
    "frame": r"\bframe\b|wood|timber|stick-built",
    "masonry": r"masonry|brick|\bblock\b|stone",
    "fire_resistive": r"fire-resistive|fire resistive|fire-res\b|reinforced concrete|poured concrete|steel and concrete|\bfr\b",
    "teacher": r"teacher",
    "accountant": r"accountant|\bcpa\b",
    "nurse": r"nurse|\brn\b",
    "software developer": r"software|programmer|web developer|coder",
    "retail manager": r"retail manager|store manager|shop manager|manager at a retail",
    "pharmacist": r"pharmacist|pharmd",
    "graphic designer": r"graphic|visual designer",
    "commercial diver": r"diver|underwater welder",
    "offshore rig worker": r"rig worker|offshore",
    "logger": r"logger|lumberjack|timber faller|logging",
    "commercial fisher": r"fisher|fishing boat",
    "tower crane operator": r"crane",
    "accounting office": r"accounting|cpa firm|bookkeeping|tax preparer",
    "dental clinic": r"dental|dentist",
    "clothing boutique": r"boutique|clothing|apparel",
    "insurance agency": r"insurance (?:agency|office|brokerage)|agency office",
    "bookstore": r"book ?(?:store|shop)|used-book",
    "restaurant": r"restaurant|diner|bistro|pizzeria",
    "bakery": r"bakery|pastry|bake shop",
    "auto repair shop": r"auto repair|mechanic|car repair|auto service",
    "dry cleaner": r"dry.clean",
    "print shop": r"print",
    "woodworking shop": r"woodworking|cabinet|millwork|woodshop",
    "furniture refinisher": r"refinish",
    "plastics molder": r"plastic|molder",
    "spray-paint shop": r"spray|paint booth|paint shop",
}


def words_to_int(text: str) -> int:
    """ "one million one hundred twenty-five thousand" -> 1125000."""
    total = current = 0
    for word in re.split(r"[ -]+", text.strip()):
        if word == "hundred":
            current *= 100
        elif word in ("thousand", "million"):
            total += current * (1000 if word == "thousand" else 1_000_000)
            current = 0
        else:
            current += WORD_VALUES[word]
    return total + current


def read_money(text: str) -> list[tuple[int, int]]:
    """Every dollar amount with its position: $1,250,000 / usd 1250000 / 1.25m / 1.25mm / 1250k / words."""
    found = {}
    for match in re.finditer(rf"(?<!\d )\b({WORD_NUMBER}(?:[ -]{WORD_NUMBER})*) dollars\b", text):
        found[match.start()] = words_to_int(match.group(1))
    for match in re.finditer(rf"\b((?:{'|'.join(WORD_VALUES)})(?:[ -]{WORD_NUMBER})*[ -](?:thousand|million))\b", text):
        found.setdefault(match.start(), words_to_int(match.group(1)))  # a large amount in words, "dollars" unsaid
    for phrase, value in IDIOMS.items():
        for match in re.finditer(re.escape(phrase), text):
            if not any(start <= match.start() < start + 80 for start in found):
                found[match.start()] = value
    pattern = r"(?<![\w.])(\$ ?|usd )?(\d[\d,]*(?:\.\d+)?)\s?(k|mm|m|million|mil|thousand)?(?!\w)( dollars)?"
    for match in re.finditer(pattern, text):
        dollar, number, suffix, dollars = match.groups()
        if not (dollar or suffix or dollars):
            continue
        scale = {"k": 1000, "thousand": 1000, "mm": 1_000_000, "m": 1_000_000, "million": 1_000_000, "mil": 1_000_000}
        found[match.start()] = round(float(number.replace(",", "")) * scale.get(suffix or "", 1))
    for match in re.finditer(r"(?<![\w.,])(\d{1,3}(?:\.\d{3})+|\d+) usd\b", text):  # 1.250.000 USD, 1250000 USD
        found[match.start()] = int(match.group(1).replace(".", ""))
    return sorted(found.items())


def find_values(patterns: list[tuple[str, object]], text: str) -> list[tuple[int, object]]:
    """(position, value) of every match; a value that is callable gets the match."""
    found = {}
    for pattern, value in patterns:
        for match in re.finditer(pattern, text):
            # the value's own position: its first group that matched ("a 1974 baby" is the second)
            position = next((match.start(g) for g in range(1, match.re.groups + 1) if match.group(g)), match.start())
            found[position] = value(match) if callable(value) else value
    return sorted(found.items())


def age_from(match: re.Match) -> int:
    """An age or a year (four digits: the age is the years since)."""
    number = int(match.group(1))
    return YEAR - number if number >= 1000 else number


def claims_from_years(match: re.Match) -> int:
    """Claims listed by year: only those of the last five years count."""
    return sum(YEAR - 5 < int(year) <= YEAR for year in re.findall(r"\d{4}", match.group(1)))


def to_count(word: str) -> int:
    return int(word) if word.isdigit() else COUNT_WORDS[word]


def miles_from(match: re.Match) -> float:
    """Miles as digits (a decimal point or comma) or words: "6,5" / "six point five" / "five"."""
    said = match.group(1)
    if said[0].isdigit():
        return float(said.replace(",", "."))
    whole, _, tenth = said.partition(" point ")
    return WORD_VALUES[whole] + (WORD_VALUES[tenth] / 10 if tenth else 0)


def count_patterns(nouns: str, labels: str) -> list[tuple[str, object]]:
    """Claims/losses as a count ("2 claims", "claims: 2", "clm free"), or listed by year."""
    count = r"(\d|no|nil|zero|one|two|three|four)"
    return [
        (rf"\b{count} (?:property )?(?:{nouns})\b", lambda m: to_count(m.group(1))),
        (
            rf"\b(?:{labels})(?: 5 yrs|_5y| \(5 yrs\)| \(5y\))?{SEP}{count}(?![\d/]| ?y)\b",
            lambda m: to_count(m.group(1)),
        ),
        (
            rf"\b(?:{labels})(?:_years)?\b(?: on record are| by year| yrs| in)?[ :=|\"\[]{{0,30}}"
            r"((?:\d{4}(?: \([a-z ]+\))?(?:, | and |/)?)+)",
            claims_from_years,
        ),
        (
            r"(?:claims history is clean|clm free|loss history is clean|loss free|claims-free|clean loss run|loss run clean)",
            0,
        ),
    ]


def flag_patterns(yes: str, no: str, labels: str) -> list[tuple[str, object]]:
    """A yes/no fact from its phrases, or a label followed by yes/y/true or no/n/false."""
    return [
        (yes, True),
        (no, False),
        (rf"\b(?:{labels}){SEP}(?:yes|y|true)\b", True),
        (rf"\b(?:{labels}){SEP}(?:no|n|false)\b", False),
    ]


def number(pattern: str, cast: type = int) -> tuple[str, object]:
    return pattern, lambda m: cast(m.group(1).replace(",", ""))


FACT_PATTERNS = {
    "age": [
        (r"\b(\d{2})(?: ?yo\b| ?y/o|-year-old| years?\b| yrs old| y\.o\.)", age_from),
        (r"\b(?:aged|turned|(?:he|she) is) (\d{2})\b", age_from),
        (
            r"(?:born|birth)[a-z ]{0,20}?(\d{4})|\ba (\d{4}) baby",
            lambda m: age_from(m) if m.group(1) else YEAR - int(m.group(2)),
        ),
        (rf"\b(?:(?:insured|applicant)[_ ])?age(?: is|[_ ]yrs)?{SEP}(\d{{2}})\b", age_from),
        (r"applicant is (\d{2})\b", age_from),
        (
            rf"(?:born(?: in)?|yob|\bb\.|dob yr|\bdob|year of birth|birth year|dob_year|birth[_ ]yr){GAP}{{0,30}}(\d{{4}})",
            age_from,
        ),
    ],
    "bmi": [
        (
            r"(?:bmi|body[_ ]mass[_ ]index)[^\d\n]{0,25}?(\d{2}[.,]\d)",
            lambda m: float(m.group(1).replace(",", ".")),
        )
    ],
    "smoker": flag_patterns(
        r"\bsmokes\b|(?<!non-)(?<!non )\bsmoker\b(?![ :=|\"]{1,30}(?:yes|y|true|no|n|false)\b)|uses tobacco|tobacco user|smoke about a pack|(?<!non-)\bsmkr\b|\btob y\b|smoking every day|is smoker(?![ :=|\"]{1,30}(?:yes|y|true|no|n|false)\b)|tobacco - yes|still smokes",
        r"non-smok|non smok|nonsmok|non-smkr|no tobacco|tobacco-free|never smoked|not smok|don't smoke|\bns\b|\bn/s\b|\btob n\b|tobacco - no|does not smoke",
        "tobacco[_ ]use|is[_ ]smoker|tobacco|tabacco|smoker|nicotine|smoking",
    ),
    "medical_history": [
        (
            r"no significant medical|history is clean|no medical hx|\bhx\W{1,4}none|pmh neg|no any illness|medical (?:history|hx)\W{1,30}none|med_hx\W{1,6}none|no health issues|healthy|clean hx|no medical history|med hx\W{1,6}none|(?:pmh|health[_ ]hx|conditions|medical_history)\W{1,30}none",
            "none",
        ),
        (r"heart attack|stroke|cancer", "serious"),
        (r"hypertension|diabetes|cholesterol|asthma", "controlled"),
    ],
    "occupation": [(OTHER_NAMES[name], name) for name in rulebook.LIFE_OCCUPATIONS],
    "construction": [(OTHER_NAMES[name], name) for name in rulebook.CONSTRUCTION_TYPES],
    "roof_age": [(rf"\b(?:roof|rf)(?:[_ ](?:yr|year|age|yrs|replaced|install))*\b{SPAN}(\d+)", age_from)],
    "fire_station_miles": [
        (rf"(\d+(?:[.,]\d+)?|{WORD_NUMBER}(?: point [a-z]+)?) ?(?:miles|mi)\b", miles_from),
        number(
            rf"(?:dist[_ ])?(?:fire[_ ]?station|fire[_ ]dept|\bfs)(?:[_ ](?:mi|miles|dist))?{SEP}(\d+(?:\.\d+)?)(?![.,]?\d)",
            float,
        ),
    ],
    "hydrant_feet": [
        number(r"(\d[\d,]*) ?(?:ft\b|feet\b|foot\b|')"),
        number(rf"hydrant(?:[_ ](?:dist|distance|ft))*{SEP}(\d[\d,]*)"),
    ],
    "prior_claims": count_patterns(
        "claims?|clms?", r"(?:num[_ ]|prior[_ ])?claims(?:[_ ]count|[_ ]5y)?|clms|clai|loss[_ ]count(?:[_ ]5y)?"
    ),
    "wind_zone": [(r"coastal", "coastal"), (r"inland", "inland")],
    "occupancy": [(OTHER_NAMES[name], name) for name in rulebook.OCCUPANCY_HAZARD],
    "sprinklered": flag_patterns(
        r"(?<!not )(?<!no )(?<!non-)\bsprinklered\b(?![ :=|\"]{1,30}(?:no|n|false)\b)|(?<!no )sprinkler system(?![ :=|\"]{1,30}(?:no|n|false)\b)|sprinklers throughout|full sprinkler|\bsprk?\W{1,3}y(?:es)?\b|fully spr|sprinklers everywhere|(?<!has no )has sprinklers",
        r"no sprinklers|no sprinkler system|sprinklers: none|no sprinkler protection|no sprinkelrs|not sprinklered|unsprinklered|non-sprinklered|\bsprk?\W{1,3}no?\b|no spr\b|sprinklers none",
        r"sprinklers|sprinklered|sprinkler[_ ]system|\bspr|auto[_ ]sprinkler",
    ),
    "building_age": [
        (
            rf"\b(?:built|bldg|blt|building|year_built|yr[_ ]built|bldg[_ ]year|building[_ ]age[_ ]yrs|construction[_ ]year)\b{SPAN}(\d+)",
            age_from,
        )
    ],
    "wiring_updated": flag_patterns(
        r"has been updated|rewired(?![ :=|\"]{1,30}(?:no|n|false)\b)|was renew|redone|wiring: updated|elec: updated|wiring updated(?![ :=|\"]{1,30}(?:no|n|false)\b)|electrical updated(?![ :=|\"]{1,30}(?:no|n|false)\b)|new wiring|elec upd|electrical upgraded|wiring redone",
        r"wiring is original|never updated|original wiring|elec original|original electrical|wiring orig\.|wiring not updated|orig wiring|orig elec|wiring\W{1,3}original|still the original|all original|never been updated|elec: original|wiring: orig\b",
        r"wiring[\W_]?upd(?:ated)?|electrical[_ ]updated|wiring[_ ]upgraded|elec[_ ]update|rewired",
    ),
    "prior_losses": count_patterns(
        "loss(?:es)?", r"(?:num[_ ]|prior[_ ])?losses(?:[_ ]5y)?|loss(?:[_ ]count(?:[_ ]5y)?)?"
    ),
}
# Money facts: the only one of its line, or told apart by the last keyword before the amount.
MONEY_KEYWORDS = {
    "face_amount": r"face|cover|sum assured|\bfa\b|sum[_ ]insured|death[_ ]benefit",
    "dwelling_value": r"dwelling|dwlg|cov[_ ]a|insured for|home[_ ]value|replacement[_ ]cost",
    "annual_revenue": r"revenue|reveune|\brev\b|sales|turn ?over|gross",
    "tiv": r"\btiv(?:_total)?\b|insured[_ ]value",
}


PENDING_ROW = r"^[^\n]*\|\s*(?:" + PENDING_WORDS.pattern + r")[^\n|]*\|?[ \t]*$"  # a table row
CLAUSE = r"(?:(?! and )[^\n.;,|/{])*"  # within one clause of a list or a sentence, or one dump row
PENDING_CLAUSE = CLAUSE + "(?:" + PENDING_WORDS.pattern + ")" + CLAUSE.replace("{", "}")
PENDING = re.compile(f"{PENDING_ROW}|{PENDING_CLAUSE}", re.MULTILINE)


def normalize(text: str, skip_noise: bool = True) -> str:
    """Lower case; drop rows no rule reads (unless told not to), correction labels and mentions of a fact
    still to come; a coastal zone said in the negative is inland."""
    text = NOISE_ROW.sub("", text.lower()) if skip_noise else text.lower()
    text = PENDING.sub(" ", text.replace(" (corrected)", "").replace("_corrected", ""))
    return re.sub(r"(?:outside|not in)(?: the)? coastal wind zone", "inland", text)


def read_facts(lob: str, text: str, skip_noise: bool = True) -> dict[str, list]:
    """Every value each fact of the line is given in the broker text, in order of appearance."""
    text = normalize(text, skip_noise)
    values = {
        key: [v for _, v in find_values(FACT_PATTERNS[key], text)]
        for key in rulebook.REQUIRED_FACTS[lob]
        if key in FACT_PATTERNS
    }
    money_keys = [key for key in rulebook.REQUIRED_FACTS[lob] if key in MONEY_KEYWORDS]
    amounts = read_money(text)
    labels = r"[a-z_]*(?:face_am|coverage_amt|sum_insured|death_benefit|fa|cov_a|dwelling|home_value|replacement_cost|revenue|sales|turnover|tiv|insured_value)[a-z_]*"
    for key in money_keys:
        raw = find_values([number(rf"\b{labels}\b{SEP}(\d{{5,}})")], text)
        amounts_here = sorted(dict(amounts + raw).items())
        if len(money_keys) == 1:
            values[key] = [v for _, v in amounts_here]
            continue
        keyword = {k: MONEY_KEYWORDS[k] for k in money_keys}
        values[key] = []
        for position, amount in amounts_here:
            before = [(m.end(), k) for k, p in keyword.items() for m in re.finditer(p, text[:position])]
            if before and max(before)[1] == key:
                values[key].append(amount)
    return values


def user_text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")


def generated_records() -> list[dict]:
    """PER_FAMILY conversations per family and line of business, from sampled cases (any outcome).

    The extra forms (`generate.py --extra-forms`, the training split's augmentation) are on in
    EXTRA_SHARE of the draws, the extra frames and mixed styles (`--extra-frames`, `--mixed-styles`) in
    FRAME_SHARE and MIX_SHARE, near-complete openings and pending facts (`--near-complete`, `--pending`)
    in NEAR_SHARE and PENDING_SHARE, amounts as bare digits or words (`--hard-amounts`) in HARD_SHARE, rows no
    rule reads (`--noise-rows`) in NOISE_SHARE, so the reader checks them too.
    """
    rng = random.Random("test-families")
    records = []
    shares = (EXTRA_SHARE, FRAME_SHARE, MIX_SHARE, NEAR_SHARE, PENDING_SHARE, HARD_SHARE, NOISE_SHARE)
    families.use_extra_forms("test-families-extra", *shares)
    try:
        for family in families.SEEN_FAMILIES + families.HELD_OUT_FAMILIES:
            for lob in rulebook.LINES_OF_BUSINESS:
                for _ in range(PER_FAMILY):
                    facts = generate.sample_facts(lob, rng)
                    decision = rulebook.decide(lob, facts)
                    messages, _, corrected = generate.build_conversation(lob, facts, decision, family, rng)
                    records.append(
                        {"family": family, "lob": lob, "facts": facts, "messages": messages, "corrected": corrected}
                    )
    finally:
        families.use_extra_forms("", 0.0)
    return records


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return generated_records()


def read_splits() -> list[dict]:
    return [
        json.loads(line) for split in ("train", "validation", "test") for line in (DATA_DIR / f"{split}.jsonl").open()
    ]


# --- the reader itself, on hand-written text ---


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,250,000", 1_250_000),
        ("USD 1250000", 1_250_000),
        ("1.25M", 1_250_000),
        ("$1.25mm", 1_250_000),
        ("1250k", 1_250_000),
        ("one million two hundred fifty thousand dollars", 1_250_000),
        ("half a million", 500_000),
        ("four hundred seventy-five thousand dollars", 475_000),
        ("1.250.000 USD", 1_250_000),
        ("$ 1,250,000", 1_250_000),
        ("$1,250,000.00", 1_250_000),
        ("1.25 mil", 1_250_000),
        ("475 thousand dollars", 475_000),
        ("11700000 USD", 11_700_000),
        ("$1850000", 1_850_000),
        ("nineteen million two hundred fifty thousand", 19_250_000),
    ],
)
def test_reader_money_forms(text, expected):
    assert [v for _, v in read_money(text.lower())] == [expected]


def test_reader_on_hand_written_notes():
    notes = (
        "Hi, call me on (555) 555-0199. Roof replaced 2013, hydrant 750', FD 2.5 miles. Mailing address 1400 Oak St. "
        "Claims: 2012 (hail), 2022 (water) and 2024 (theft). Brick masonry, not in the coastal wind zone, Cov A 1.2M."
    )
    values = read_facts("homeowners", notes)
    assert {k: v[-1] for k, v in values.items()} == {
        "construction": "masonry",
        "roof_age": 12,
        "fire_station_miles": 2.5,
        "hydrant_feet": 750,
        "prior_claims": 2,
        "wind_zone": "inland",
        "dwelling_value": 1_200_000,
    }


# --- every family carries every fact, readably ---


def test_generated_families_cover_the_requested_kinds():
    assert len(families.SEEN_FAMILIES) >= 10 and families.HELD_OUT_FAMILIES == ("form_fields",)
    assert not set(families.SEEN_FAMILIES) & set(families.HELD_OUT_FAMILIES)


def assert_facts_read_back(lob: str, family: str, facts: dict, corrected: dict, text: str) -> None:
    """Every fact is read from the text; the last mention is the fact, and only a corrected fact changes."""
    values = read_facts(lob, text)
    for key, value in facts.items():
        said = values[key]
        assert said, (family, key, text)
        assert said[-1] == value, (family, key, said, value, text)
        if key not in corrected:
            assert set(said) == {value}, (family, key, said, text)


def test_every_fact_is_read_back_from_the_user_turns(records):
    for record in records:
        assert_facts_read_back(record["lob"], record["family"], record["facts"], record["corrected"], user_text(record))


def test_the_worksheet_writes_an_age_in_the_unit_the_broker_used_last(records):
    # "born 1974" when the last mention of the age was a year, "age 51" when it was years (frames too).
    checked = 0
    for record in records:
        if record["lob"] != "term_life" or record["family"] in ("fwd_table", "kv_export"):
            continue
        text = normalize(user_text(record))
        mentions = [
            (m.start(), len(next(g for g in m.groups() if g)) == 4)
            for pattern, _ in FACT_PATTERNS["age"]
            for m in re.finditer(pattern, text)
        ]
        facts_line = record["messages"][-1]["content"].splitlines()[0]
        assert ("born " in facts_line) == max(mentions)[1], (facts_line, text)
        checked += 1
    assert checked > 200, checked


def test_corrections_say_the_wrong_value_first_and_the_right_one_last(records):
    corrected = [r for r in records if r["corrected"]]
    assert {r["family"] for r in corrected} == set(families.SEEN_FAMILIES + families.HELD_OUT_FAMILIES)
    for record in corrected:
        [(key, wrong)] = record["corrected"].items()
        assert wrong != record["facts"][key]
        said = read_facts(record["lob"], user_text(record))[key]
        assert said[0] == wrong and said[-1] == record["facts"][key], (record["family"], key, said, user_text(record))
        first_user = record["messages"][1]["content"]
        assert read_facts(record["lob"], first_user)[key][-1] == wrong


def test_surface_forms_vary(records):
    # Money in several forms, ages as birth years, claims listed by year, feet/miles spellings.
    text = "\n".join(user_text(r).lower() for r in records)
    for form in [
        r"\$\d{1,3},\d{3},\d{3}",
        r"\d\.?\d*m\b",
        r"\d+k\b",
        r"thousand dollars",
        r"\d+'",
        r"\d feet",
        r"\d mi\b",
        # the extra forms (on in these records): decimal commas, European thousands, words, new phrases
        r"\d,\d (?:miles|mi)\b",
        r"bmi[^\n]{0,12}\d\d,\d",
        r"\d{1,3}\.\d{3}(?:\.\d{3})? usd",
        r"[a-z]+ point [a-z]+ miles",
        r"loss run",
        r"\bnil (?:claims|losses)",
        r"\d foot\b",
        r"elec original|original electrical|wiring orig\.",
        r"sprinklers throughout|full sprinkler coverage|sprinklered 100%",
        # the extra frames (on in these records too): other sentences around a fact
        r"turned \d\d this year|is aged \d\d|\d\d yrs old",
        r"by trade|makes (?:his|her) living as|employed (?:full time )?as",
        r"gross around|annual sales run",
        r"the tenant is|operates an? ",
        # mixed styles (on in these records too): field names of other systems
        r"\b(?:yob|birth_yr|insured_age|applicant_age|fs_mi|cov_a|tiv_total|sum_insured)\b",
    ]:
        assert re.search(form, text), form
    assert re.search(r"(?:born|yob|b\.|dob_year|year of birth)\W{0,30}19\d\d", text)
    assert re.search(r"claims[^\n]*20[01]\d \(", text) and re.search(r"losses[^\n]*20[01]\d", text)


@pytest.mark.parametrize(
    ("shares", "least_changed"),
    [
        ({"extra_share": 0.5}, 0.8),
        ({"frame_share": 0.5}, 0.6),  # no frames in tables and dumps
        ({"mix_share": 0.5}, 0.8),
        ({"hard_share": 1.0}, 0.8),
        ({"noise_share": 1.0}, 0.15),  # tables and dumps only: 2 of the 10 families
    ],
    ids=["forms", "frames", "mix", "hard", "noise"],
)
def test_extra_forms_change_only_the_training_split_words(shares, least_changed):
    # Extra forms, frames and mixed styles come from generators of their own: turned on, the training
    # split keeps its cases, families and decisions draw for draw, and only broker words change;
    # validation is untouched. Forms and frames keep an age's unit, so the assistant turns are the same;
    # another style's template may say an age as a birth year, and the worksheet follows that unit.
    def build(shares: dict[str, float]) -> dict[str, list[dict]]:
        seen: set[str] = set()
        return {split: generate.build_split(split, 30, 7, seen, **shares) for split in ("train", "validation")}

    plain, extra = build({}), build(shares)
    assert extra["validation"] == plain["validation"]
    changed = 0
    for a, b in zip(plain["train"], extra["train"], strict=True):
        assert {k: v for k, v in a.items() if k != "messages"} == {k: v for k, v in b.items() if k != "messages"}
        replies = [[m["content"] for m in r["messages"] if m["role"] != "user"] for r in (a, b)]
        if "mix_share" in shares:
            replies = [[reply.splitlines()[-1] for reply in turns] for turns in replies]  # asks and DECISION lines
        assert replies[0] == replies[1]
        changed += a["messages"] != b["messages"]
    assert changed > least_changed * len(plain["train"]), changed


def test_hard_amounts_are_bare_digits_or_words_and_read_back():
    # Turned on fully, every dollar amount of the training split is said as bare digits ("USD 11700000",
    # "$1850000", "11700000 USD"; dumps and tables write bare digits anyway) or in words. That the reader gets
    # their values back is test_every_fact_is_read_back_from_the_user_turns (HARD_SHARE).
    seen: set[str] = set()
    records = generate.build_split("train", 60, 7, seen, hard_share=1.0)
    forms = {"digits": 0, "words": 0}
    for record in records:
        text = user_text(record).lower()
        said_in_words = [words_to_int(m[1]) for m in re.finditer(rf"\b({WORD_NUMBER}\b(?:[ -]{WORD_NUMBER}\b)+)", text)]
        money = {key: value for key, value in record["facts"].items() if key in MONEY_KEYWORDS}
        for key, value in {**money, **{k: v for k, v in record["corrected"].items() if k in MONEY_KEYWORDS}}.items():
            digits = re.search(rf"(?<![\d,.]){value}(?![\d]|[,.]\d)", text)
            assert digits or value in said_in_words, (key, value, text)
            forms["digits" if digits else "words"] += 1
    assert min(forms.values()) > 0.3 * sum(forms.values()), forms


def test_noise_rows_sit_in_tables_and_dumps_and_carry_no_fact():
    # Turned on fully, every table and dump turn of the training split carries 1-3 rows no rule reads; the
    # reader, which skips those fields, still reads every fact back (and with them kept, it would not:
    # a premium or a payroll would be read as the dwelling or the face amount).
    seen: set[str] = set()
    records = generate.build_split("train", 90, 7, seen, noise_share=1.0)
    structured = [r for r in records if r["phrasing_family"] in ("fwd_table", "kv_export")]
    assert len(structured) >= 15
    misread = 0
    for record in structured:
        for turn in (m["content"] for m in record["messages"] if m["role"] == "user"):
            assert 1 <= len(NOISE_ROW.findall(turn.lower())) <= 3, turn
        lob, text = record["line_of_business"], user_text(record)
        assert_facts_read_back(lob, record["phrasing_family"], record["facts"], record["corrected"], text)
        kept = {key: values[-1:] for key, values in read_facts(lob, text, skip_noise=False).items()}
        misread += kept != {key: values[-1:] for key, values in read_facts(lob, text).items()}
    assert misread > 0.2 * len(structured), misread


def test_near_complete_openings_and_pending_facts_change_only_the_training_split():
    # Brokers mostly send all facts but one or two and name one still to come. Turned on fully: every
    # opening with asking turns withholds one fact per later broker turn (the asking turns miss n, ..., 1),
    # names exactly one fact as pending and gives no value for any withheld fact; validation is untouched.
    def build(near: float, pending: float) -> dict[str, list[dict]]:
        seen: set[str] = set()
        return {
            split: generate.build_split(split, 60, 7, seen, near_share=near, pending_share=pending)
            for split in ("train", "validation")
        }

    plain, shaped = build(0.0, 0.0), build(1.0, 1.0)
    assert shaped["validation"] == plain["validation"]
    assert not any(PENDING_WORDS.search(r["messages"][1]["content"]) for r in plain["train"])
    asking = [r for r in shaped["train"] if r["ask_facts"]]
    assert len(asking) > 40
    for record in asking:
        turns = len(record["ask_facts"])
        assert [len(facts) for facts in record["ask_facts"]] == list(range(turns, 0, -1)), record["ask_facts"]
        opening = record["messages"][1]["content"]
        assert len(PENDING_WORDS.findall(opening)) == 1, opening
        values = read_facts(record["line_of_business"], opening)
        assert not any(values.get(key) for key in record["ask_facts"][0]), (opening, record["ask_facts"][0])
        [mention] = PENDING.findall(opening.lower())
        named = {key for key, name in FACT_NAMES.items() if re.search(name, mention)}
        assert named & set(record["ask_facts"][0]), (mention, record["ask_facts"][0])
    plain_first = [len(r["ask_facts"][0]) for r in plain["train"] if r["ask_facts"]]
    assert sum(n == 1 for n in plain_first) < 0.3 * len(plain_first)  # the usual openings withhold 1-5 evenly


def test_categories_go_by_other_names_and_the_hazard_class_is_said_only_sometimes(records):
    # The worksheet writes the rulebook's names; the broker often uses others ("RN", "brick").
    text = "\n".join(user_text(r).lower() for r in records)
    for other in (r"\brn\b", r"\bcpa\b", r"brick", r"timber|wood\b", r"reinforced concrete|poured concrete"):
        assert re.search(other, text), other
    for key in ("occupation", "occupancy", "construction"):
        canonical = [
            r for r in records if key in r["facts"] and str(r["facts"][key]).replace("_", "-") in user_text(r).lower()
        ]
        assert 0.2 < len(canonical) / sum(key in r["facts"] for r in records) < 0.9, key
    business = [user_text(r).lower() for r in records if r["lob"] == "small_business_property"]
    with_class = sum(bool(re.search(r"(?:low|moderate|high)[ -]haz", t)) for t in business)
    assert 0.1 < with_class / len(business) < 0.7, with_class


def test_distractor_numbers_appear_where_claimed(records):
    marker = r"\(\d{3}\) 555-\d{4}|555-\d{4}|\b(?:pol|hb|qt|ref)-\d{5}\b|\d{1,2}/\d{1,2}|\d+ (?:oak|harbor|maple|mill|cedar) "
    for record in records:
        text = user_text(record).lower()
        if record["family"] in families.DISTRACTOR_FAMILIES:
            assert re.search(marker, text), (record["family"], text)


def test_worksheet_uses_the_corrected_value(records):
    # The facts line restates the corrected value, whichever unit (age or year) the broker used.
    unit_choices = [set(), {"age", "roof_age", "building_age"}]
    for record in records:
        if not record["corrected"]:
            continue
        facts_line = record["messages"][-1]["content"].splitlines()[0]
        wrong_facts = record["facts"] | record["corrected"]
        assert facts_line in {generate.worksheet_facts(record["lob"], record["facts"], u) for u in unit_choices}
        assert facts_line not in {generate.worksheet_facts(record["lob"], wrong_facts, u) for u in unit_choices}


# --- the committed splits ---


def test_committed_splits_read_back():
    for record in read_splits():
        lob, family = record["line_of_business"], record["phrasing_family"]
        assert_facts_read_back(lob, family, record["facts"], record["corrected"], user_text(record))


def test_conditions_sit_on_the_firing_rules_line():
    checked = 0
    for record in read_splits():
        decision, reply = record["decision"], record["messages"][-1]["content"]
        lines = reply.splitlines()
        for rule_id in decision["rules"]:
            condition = rulebook.get_rule(rule_id).condition
            if rulebook.get_rule(rule_id).applies is None:  # the grant rule has no check line
                continue
            line = next(line for line in lines if line.startswith(rule_id + " "))
            if decision["outcome"] == "approve" and condition:
                assert f": {rulebook.get_rule(rule_id).effect}, condition {condition} -> " in line, (record["id"], line)
                checked += 1
            else:
                assert ", condition " not in line, (record["id"], line)
        assert sorted(parse_conditions(reply)) == sorted(c.lower() for c in decision["conditions"]), record["id"]
    assert checked >= 20


def test_held_out_family_keeps_a_quarter_of_test_only():
    by_split = {}
    for record in read_splits():
        by_split.setdefault(record["id"].split("-")[0], []).append(record["phrasing_family"])
    assert by_split["test"].count("form_fields") == 25
    assert "form_fields" not in by_split["train"] + by_split["validation"]
    assert set(by_split["train"]) == set(by_split["validation"]) == set(families.SEEN_FAMILIES)


def test_worksheet_errors_reads_a_check_line_with_a_condition():
    facts = {"construction": "masonry", "roof_age": 22, "fire_station_miles": 2.0, "hydrant_feet": 300}
    facts |= {"prior_claims": 0, "wind_zone": "inland", "dwelling_value": 400_000}
    decision = rulebook.decide("homeowners", facts)
    reply = generate.write_decision_turn("homeowners", facts, decision, set(), random.Random(0))
    line = "H-7 masonry limit 25, roof 22 >= 15 yes, roof 22 <= 25 yes: standard, condition roof inspection within 30 days -> standard H-7"
    assert decision["rules"] == ["H-7"] and line in reply.splitlines()
    _, checks = worksheet_errors.parse_worksheet(reply)
    assert ("H-7", "masonry limit 25, roof 22 >= 15 yes, roof 22 <= 25 yes", "standard", "standard H-7") in checks
    assert parse_conditions(reply) == ["roof inspection within 30 days"]
