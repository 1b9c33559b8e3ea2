"""How brokers write: the phrasing families of the broker (user) turns of `data/generate.py`.

Each family is one way people send a submission: a polite email, bullet notes, a chatty message,
underwriter shorthand, a long email with stories and numbers that are not facts, forwarded notes
with a plain-text table, pasted call notes, a team chat, non-native English, a key/value dump, and
the held-out `form_fields` (test split only). Inside a family the facts vary too: money as
$1,250,000 / 1.25M / 1250k / words, ages as years or a birth year, feet as ft / feet / ', miles as
mi / miles, claims as a count or listed by year (often with a year outside the five-year window),
the words people use for a category ("RN" for nurse, "brick" for masonry, "cabinet shop" for a
woodworking shop; an occupancy's hazard class said only sometimes), typos (in the surrounding
words, and a few misspelled fact words), all-lower or all-upper case, and a fact said wrong first
and corrected in a later turn.
Only the words change: the facts, the decision and the assistant's turns come from generate.py.

    python -c "import random; from data import families; print(families.write_user_turn('homeowners', \
['roof_age', 'hydrant_feet'], {'roof_age': 12, 'hydrant_feet': 500}, 'long_email', random.Random(0), True, set()))"
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from data import rulebook

YEAR = rulebook.REFERENCE_YEAR
SEEN_FAMILIES = (
    "broker_email",
    "bullet_notes",
    "chatty_agent",
    "uw_shorthand",
    "long_email",
    "fwd_table",
    "call_log",
    "colleague_chat",
    "non_native",
    "kv_export",
)
HELD_OUT_FAMILIES = ("form_fields",)  # test split only: measures generalization to new phrasing
# The families whose turns carry numbers that are not facts (phones, dates, street and policy numbers).
DISTRACTOR_FAMILIES = ("long_email", "fwd_table", "call_log", "colleague_chat")
# How each family says one fact (a key of PHRASES' inner dicts; "table" and "kv" use FIELD_LABELS).
FAMILY_STYLE = {
    "broker_email": "prose",
    "bullet_notes": "terse",
    "chatty_agent": "prose",
    "uw_shorthand": "short",
    "long_email": "prose",
    "fwd_table": "table",
    "call_log": "terse",
    "colleague_chat": "prose",
    "non_native": "nonnative",
    "kv_export": "kv",
    "form_fields": "form",
}
CLAIMS_BY_YEAR_SHARE = 0.35  # claims/losses listed by year instead of counted (not in form_fields)
OLD_CLAIM_SHARE = 0.7  # lists by year that also name a claim older than the five-year window
LOB_NAMES = {
    "term_life": ("term life", "term life insurance"),
    "homeowners": ("homeowners", "home insurance"),
    "small_business_property": ("small business property", "commercial property"),
}

# --- how each fact is said ---
# Keys are "fact=value" for categorical variants, else the fact name; see `render_fact`. Fields:
# {money} any money form, {yrs} "12 years"/"12 yrs", {mi} "2.3 miles"/"2.3 mi", {ft} "500 ft"/"500'",
# {year} the year an age counts from, {n} a count as digits or a word.
PHRASES = {
    "age": {
        "prose": ["the applicant is {age}", "the applicant is {age} years old", "the applicant was born in {year}"],
        "terse": ["age {age}", "{age} y/o", "{age}-year-old", "born {year}", "DOB yr {year}"],
        "short": ["{age}yo", "YOB {year}", "b.{year}", "age {age}"],
        "nonnative": ["the client have {age} years", "applicant is born in {year}", "applicant age is {age} year"],
        "form": ["Age: {age}", "Birth year: {year}"],
    },
    "face_amount": {
        "prose": ["they want {money} of cover", "the requested face amount is {money}", "coverage asked is {money}"],
        "terse": ["face {money}", "{money} face", "cover {money}"],
        "short": ["FA {money}", "face amt {money}", "{money} face"],
        "nonnative": ["he want cover of {money}", "the face amount he ask is {money}"],
        "form": ["Face amount: {money}"],
    },
    "bmi": {
        "prose": ["the BMI is {bmi}", "body mass index is {bmi}"],
        "terse": ["BMI {bmi}"],
        "short": ["bmi {bmi}", "BMI={bmi}"],
        "nonnative": ["his BMI is at {bmi}"],
        "form": ["BMI: {bmi}"],
    },
    "smoker=True": {
        "prose": [
            "the applicant smokes",
            "they are a current smoker",
            "the applicant uses tobacco daily",
            "they smoke about a pack a day",
        ],
        "terse": ["smoker", "tobacco: yes", "tabacco: yes", "smokes cigarettes", "tobacco user"],
        "short": ["smkr", "tob Y", "cig smoker"],
        "nonnative": ["he is smoking every day", "the client is smoker"],
        "form": ["Tobacco: yes"],
    },
    "smoker=False": {
        "prose": [
            "the applicant is a non-smoker",
            "there is no tobacco use",
            "they have never smoked",
            "the applicant does not smoke",
        ],
        "terse": ["non-smoker", "tobacco: no", "tabacco: no", "nonsmoker", "non smoker", "tobacco-free"],
        "short": ["NS", "non-smkr", "tob N", "N/S"],
        "nonnative": ["he is not smoking", "the client don't smoke"],
        "form": ["Tobacco: no"],
    },
    "medical_history=none": {
        "prose": ["there is no significant medical history", "the medical history is clean"],
        "terse": ["no medical hx", "hx: none", "no health issues", "healthy, no conditions"],
        "short": ["PMH neg", "hx none", "clean hx"],
        "nonnative": ["no any illness in medical history"],
        "form": ["Medical history: none"],
    },
    "medical_history": {
        "prose": ["the applicant {verb} {cond}", "the medical history shows {cond}"],
        "terse": ["hx: {cond}"],
        "short": ["PMH {cond}", "hx {cond}"],
        "nonnative": ["in medical history he {verb} {cond}"],
        "form": ["Medical history: {cond}"],
    },
    "occupation": {
        "prose": ["the applicant works as {a_occ}", "the occupation is {occ}"],
        "terse": ["occ: {occ}", "{occ}"],
        "short": ["occ {occ}", "{occ}"],
        "nonnative": ["he is working like {occ}", "his work is {occ}"],
        "form": ["Occupation: {occ}"],
    },
    "construction": {
        "prose": ["it is a {c} house", "construction is {c}"],
        "terse": ["{c} construction", "const: {c}"],
        "short": ["{c}", "const {c}"],
        "nonnative": ["the house is made in {c}", "construction type is {c}"],
        "form": ["Construction: {c}"],
    },
    "roof_age": {
        "prose": ["the roof is {n} years old", "the roof was replaced in {year}", "the roof is {yrs} old"],
        "terse": ["roof {yrs}", "roof {year}", "roof replaced {year}"],
        "short": ["rf {yrs}", "roof {year}", "rf new {year}"],
        "nonnative": ["the roof have {yrs}", "roof was make new in {year}"],
        "form": ["Roof age: {n} years", "Roof year: {year}"],
    },
    "fire_station_miles": {
        "prose": ["the nearest fire station is {mi} away", "it is {mi} from the fire station"],
        "terse": ["FD {mi}", "fire station {mi}"],
        "short": ["FD {mi}", "FS {mi}"],
        "nonnative": ["fire station is {mi} far", "until the fire station is {mi}"],
        "form": ["Fire station: {x} miles"],
    },
    "hydrant_feet": {
        "prose": ["the closest hydrant is {ft} away", "there is a hydrant {ft} from the house"],
        "terse": ["hydrant {ft}", "hydrnat {ft}"],
        "short": ["hyd {ft}", "FH {ft}"],
        "nonnative": ["hydrant is at {ft} from house"],
        "form": ["Hydrant distance: {x} ft"],
    },
    "prior_claims=0": {
        "prose": ["there were no claims in the last five years", "the claims history is clean for 5 years"],
        "terse": ["no claims 5 yrs", "claims: 0"],
        "short": ["0 clms/5y", "clm free 5y"],
        "nonnative": ["no claims in the last five year"],
        "form": ["Claims (5 yrs): 0"],
    },
    "prior_claims=1": {
        "prose": ["there was one claim in the last five years"],
        "terse": ["1 claim in 5 yrs", "claims: 1"],
        "short": ["1 clm/5y", "clms 1"],
        "nonnative": ["they made one claim in last five years"],
        "form": ["Claims (5 yrs): 1"],
    },
    "prior_claims": {
        "prose": ["there were {n} claims in the last five years", "they filed {n} claims in 5 years"],
        "terse": ["{n} claims in 5 yrs", "claims: {n}"],
        "short": ["{n} clms/5y", "clms {n}"],
        "nonnative": ["they made {n} claims in last five years"],
        "form": ["Claims (5 yrs): {n}"],
    },
    "wind_zone=coastal": {
        "prose": ["it sits in the coastal wind zone", "the property is inside the coastal wind zone"],
        "terse": ["coastal wind zone", "wind: coastal"],
        "short": ["wind coastal", "cst wind zone (coastal)"],
        "nonnative": ["house is in the coastal wind zone"],
        "form": ["Wind zone: coastal"],
    },
    "wind_zone=inland": {
        "prose": ["it is inland, outside the coastal wind zone", "the property is not in the coastal wind zone"],
        "terse": ["inland", "wind: inland"],
        "short": ["inland", "wind inland"],
        "nonnative": ["house is inland, not in coastal wind zone"],
        "form": ["Wind zone: inland"],
    },
    "dwelling_value": {
        "prose": ["the dwelling value is {money}", "they want the home insured for {money}"],
        "terse": ["Cov A {money}", "dwelling {money}"],
        "short": ["Cov A {money}", "dwlg {money}"],
        "nonnative": ["the value of dwelling is {money}"],
        "form": ["Dwelling value: {money}"],
    },
    "occupancy": {
        "prose": ["the insured runs {a_occ}", "occupancy is {a_occ}", "the business is {a_occ}"],
        "terse": ["{occ}", "occ: {occ}", "occupancy {occ}"],
        "short": ["{occ}", "occ {occ}"],
        "nonnative": ["the business is {a_occ}", "they are having {a_occ}"],
        "form": ["Occupancy: {occ}"],
    },
    "sprinklered=True": {
        "prose": ["the building is fully sprinklered", "there is a sprinkler system throughout"],
        "terse": ["sprinklered", "spr: yes", "sprinklers: yes", "wet sprinkler system throughout"],
        "short": ["spr Y", "fully spr", "sprk Y"],
        "nonnative": ["building have sprinklers everywhere"],
        "form": ["Sprinklers: yes"],
    },
    "sprinklered=False": {
        "prose": ["there are no sprinklers", "the building is not sprinklered"],
        "terse": ["no sprinklers", "spr: no", "no sprinkelrs", "unsprinklered", "non-sprinklered"],
        "short": ["spr N", "no spr", "sprk N"],
        "nonnative": ["building have no sprinklers"],
        "form": ["Sprinklers: no"],
    },
    "building_age": {
        "prose": ["the building is {yrs} old", "it was built in {year}"],
        "terse": ["built {year}", "bldg {yrs}"],
        "short": ["blt {year}", "bldg {yrs}"],
        "nonnative": ["the building have {yrs}", "building is construct in {year}"],
        "form": ["Year built: {year}", "Building age: {n} years"],
    },
    "wiring_updated=True": {
        "prose": ["the wiring has been updated", "it has been fully rewired"],
        "terse": ["wiring updated", "rewired", "electrical updated", "new wiring"],
        "short": ["wiring upd Y", "rewired", "elec upd"],
        "nonnative": ["electric wiring was renew"],
        "form": ["Wiring updated: yes"],
    },
    "wiring_updated=False": {
        "prose": ["the wiring is original", "the electrical was never updated"],
        "terse": ["original wiring", "wiring not updated", "electrical never updated", "wiring: original"],
        "short": ["orig wiring", "wiring upd N", "orig elec"],
        "nonnative": ["the wiring is still the original one"],
        "form": ["Wiring updated: no"],
    },
    "annual_revenue": {
        "prose": ["annual revenue is {money}", "they turn over {money} a year"],
        "terse": ["revenue {money}", "rev {money}/yr", "reveune {money}"],
        "short": ["rev {money}", "sales {money}/yr"],
        "nonnative": ["yearly revenue is {money}"],
        "form": ["Annual revenue: {money}"],
    },
    "tiv": {
        "prose": ["total insured value is {money}", "the TIV comes to {money}"],
        "terse": ["TIV {money}"],
        "short": ["TIV {money}", "tiv {money}"],
        "nonnative": ["total insured value (TIV) is {money}"],
        "form": ["TIV: {money}"],
    },
    "prior_losses=0": {
        "prose": ["there were no property losses in five years", "the loss history is clean"],
        "terse": ["no losses 5 yrs", "losses: 0"],
        "short": ["0 losses/5y", "loss free 5y"],
        "nonnative": ["no losses in last five year"],
        "form": ["Losses (5 yrs): 0"],
    },
    "prior_losses=1": {
        "prose": ["there was one property loss in the last five years"],
        "terse": ["1 loss in 5 yrs", "losses: 1"],
        "short": ["1 loss/5y", "losses 1"],
        "nonnative": ["they had one loss in last five years"],
        "form": ["Losses (5 yrs): 1"],
    },
    "prior_losses": {
        "prose": ["there were {n} property losses in the last five years"],
        "terse": ["{n} losses in 5 yrs", "losses: {n}"],
        "short": ["{n} losses/5y", "losses {n}"],
        "nonnative": ["they had {n} losses in last five years"],
        "form": ["Losses (5 yrs): {n}"],
    },
}
# An occupancy said with its hazard class, in OCCUPANCY_HAZARD_SHARE of the mentions; brokers rarely
# write the class, so the worksheet's class must come from the rulebook's table, not from the text.
OCCUPANCY_HAZARD_SHARE = 0.3
OCCUPANCY_WITH_HAZARD = {
    "prose": ["the insured runs {a_occ} ({hazard} hazard)", "occupancy is {a_occ}, {hazard}-hazard class"],
    "terse": ["{occ} ({hazard} hazard)", "occ: {occ}, {hazard} hazard"],
    "short": ["{occ} ({hazard} haz)", "occ {occ} / {hazard} haz"],
    "nonnative": ["the business is {a_occ} ({hazard} hazard)"],
    "form": ["Occupancy: {occ} ({hazard} hazard)"],
}
# Labels of the table and key/value families: (label, how the value is written). "year" writes an
# age as the year it counts from; "count" a number of claims; "flag" yes/no; "text" a word.
FIELD_LABELS = {
    "age": {"table": [("Age", "age"), ("Year of birth", "year")], "kv": [("age", "age"), ("dob_year", "year")]},
    "face_amount": {"table": [("Face amount", "money"), ("Sum assured", "money")], "kv": [("face_amt", "money")]},
    "bmi": {"table": [("BMI", "bmi")], "kv": [("bmi", "bmi")]},
    "smoker": {"table": [("Tobacco", "flag"), ("Smoker", "flag")], "kv": [("smoker", "flag"), ("tobacco", "flag")]},
    "medical_history": {"table": [("Medical hx", "text")], "kv": [("med_hx", "text")]},
    "occupation": {"table": [("Occupation", "text")], "kv": [("occupation", "text")]},
    "construction": {"table": [("Construction", "text")], "kv": [("construction", "text")]},
    "roof_age": {"table": [("Roof age", "yrs"), ("Roof replaced", "year")], "kv": [("roof_yr", "year")]},
    "fire_station_miles": {"table": [("Fire station", "mi")], "kv": [("fire_station_mi", "x")]},
    "hydrant_feet": {"table": [("Hydrant", "ft")], "kv": [("hydrant_ft", "x")]},
    "prior_claims": {"table": [("Claims 5 yrs", "count")], "kv": [("claims_5y", "count")]},
    "wind_zone": {"table": [("Wind zone", "text")], "kv": [("wind_zone", "text")]},
    "dwelling_value": {"table": [("Dwelling (Cov A)", "money")], "kv": [("dwelling_value", "money")]},
    "occupancy": {"table": [("Occupancy", "text")], "kv": [("occupancy", "text")]},
    "sprinklered": {"table": [("Sprinklers", "flag")], "kv": [("sprinklered", "flag")]},
    "building_age": {"table": [("Year built", "year"), ("Bldg age", "yrs")], "kv": [("year_built", "year")]},
    "wiring_updated": {"table": [("Wiring updated", "flag")], "kv": [("wiring_updated", "flag")]},
    "annual_revenue": {"table": [("Annual revenue", "money")], "kv": [("revenue", "money")]},
    "tiv": {"table": [("TIV", "money")], "kv": [("tiv", "money")]},
    "prior_losses": {"table": [("Losses 5 yrs", "count")], "kv": [("losses_5y", "count")]},
}
CONDITION_EXAMPLES = {
    "controlled": [
        "hypertension controlled with medication",
        "well-controlled type 2 diabetes",
        "treated high cholesterol",
        "mild asthma on an inhaler",
    ],
    "serious": ["a heart attack in {year}", "a stroke in {year}", "cancer treatment that ended in {year}"],
}
# What people call each categorical value; the worksheet always writes the rulebook's own name.
# Each mention uses the rulebook's name or, in NAME_VARIANT_SHARE of them, one of these.
NAME_VARIANT_SHARE = 0.5
CONSTRUCTION_NAMES = {
    "frame": ["wood frame", "frame"],
    "masonry": ["masonry", "brick masonry"],
    "fire_resistive": ["fire-resistive", "concrete fire-resistive"],
}
NAME_VARIANTS = {
    "frame": ["wood", "timber frame", "stick-built", "wooden", "wood-framed", "timber"],
    "masonry": ["brick", "solid brick", "concrete block", "cinder block", "CMU block", "stone", "block"],
    "fire_resistive": ["reinforced concrete", "poured concrete", "steel and concrete", "fire resistive", "FR"],
    "teacher": ["school teacher", "high school teacher", "math teacher", "kindergarten teacher"],
    "accountant": ["CPA", "tax accountant", "chartered accountant", "staff accountant"],
    "nurse": ["RN", "registered nurse", "ICU nurse", "staff nurse"],
    "software developer": ["software engineer", "programmer", "web developer", "software dev", "coder"],
    "retail manager": ["store manager", "shop manager", "manager at a retail store"],
    "pharmacist": ["PharmD", "hospital pharmacist", "retail pharmacist"],
    "graphic designer": ["graphic artist", "visual designer", "designer (graphics)"],
    "commercial diver": ["saturation diver", "professional diver", "underwater welder"],
    "offshore rig worker": ["oil rig worker", "roughneck offshore", "offshore driller", "offshore platform hand"],
    "logger": ["lumberjack", "timber faller", "logging crew member"],
    "commercial fisher": ["fisherman", "commercial fisherman", "deckhand on a fishing boat", "crab fisherman"],
    "tower crane operator": ["crane operator", "tower crane driver", "crane driver"],
    "accounting office": ["CPA firm", "accounting firm", "bookkeeping office", "tax preparer's office"],
    "dental clinic": ["dentist's office", "dental office", "dental practice"],
    "clothing boutique": ["boutique", "clothing store", "apparel shop", "fashion boutique"],
    "insurance agency": ["insurance office", "insurance brokerage", "agency office"],
    "bookstore": ["book shop", "bookshop", "used-book store"],
    "restaurant": ["diner", "bistro", "pizzeria", "family restaurant"],
    "bakery": ["bread bakery", "pastry shop", "bake shop"],
    "auto repair shop": ["auto repair garage", "mechanic's garage", "car repair shop", "auto service center"],
    "dry cleaner": ["dry cleaning shop", "dry-cleaners", "laundry and dry cleaning"],
    "print shop": ["printing shop", "commercial printer", "print and copy shop", "offset printer"],
    "woodworking shop": ["cabinet shop", "cabinet maker", "millwork shop", "woodshop"],
    "furniture refinisher": ["furniture refinishing shop", "furniture stripping and refinishing", "antique refinisher"],
    "plastics molder": ["injection molder", "plastic injection molding plant", "plastics manufacturer"],
    "spray-paint shop": ["spray painting shop", "paint booth shop", "auto body paint shop", "spray booth"],
}
MONEY_WORDS = {
    250_000: "a quarter million",
    500_000: "half a million",
    750_000: "three quarters of a million",
    1_000_000: "one million",
    2_000_000: "two million",
}
ROUND_AMOUNTS = sorted(MONEY_WORDS)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
CLAIM_CAUSES = ("hail", "water", "theft", "wind", "kitchen fire", "burst pipe")


def say_number(number: int) -> str:
    """An integer below a billion in words: 1250000 -> "one million two hundred fifty thousand"."""

    def below_thousand(n: int) -> list[str]:
        words = [ONES[n // 100], "hundred"] if n >= 100 else []
        n %= 100
        if 10 <= n < 20:
            return [*words, TEENS[n - 10]]
        tens = TENS[n // 10] + ("-" + ONES[n % 10] if n >= 20 and n % 10 else "")
        return [*words, tens if n >= 20 else ONES[n]]

    parts = []
    for scale, name in ((1_000_000, "million"), (1_000, "thousand"), (1, "")):
        chunk = number // scale % 1000
        if chunk:
            parts += [w for w in below_thousand(chunk) if w] + ([name] if name else [])
    return " ".join(parts) or "zero"


def format_money_varied(amount: int, rng: random.Random) -> str:
    """Dollars in one of many broker styles: $250,000 / 250k / $1.25M / USD 250000 / words (+ extra forms)."""
    options = [f"${amount:,}", f"USD {amount}", f"{amount:,} dollars", f"${amount // 1000:,}k"]
    if amount < 1_000_000:
        options += [f"{amount // 1000}k", f"{amount // 1000}K"]
    if amount >= 1_000_000 and amount % 10_000 == 0:
        options += [f"${amount / 1e6:g}M", f"{amount / 1e6:g} million", f"${amount / 1e6:g}m", f"{amount / 1e6:g}MM"]
    if amount in MONEY_WORDS:
        options.append(MONEY_WORDS[amount])
    options.append(say_number(amount) + " dollars")
    usual = rng.choice(options)
    extra = [f"{amount:,} USD".replace(",", "."), f"${amount:,}.00", f"$ {amount:,}", f"USD {amount:,}"]
    extra += [f"{amount // 1000} thousand dollars"] if amount < 1_000_000 else [f"{amount // 1000:,}K"]
    if amount >= 1_000_000 and amount % 10_000 == 0:
        extra += [f"{amount / 1e6:g} mil", f"${amount / 1e6:g} million"]
    return hard_amount(amount) or extra_form(extra) or usual


def hard_amount(amount: int) -> str | None:
    """An amount as bare digits or in words in the hard-amount share of the draws (`HARD_AMOUNT_SHARE`), else None."""
    rng = _extra["hard_rng"]
    if _extra["hard"] <= 0 or rng.random() >= _extra["hard"]:
        return None
    digits = [f"USD {amount}", f"{amount} dollars", f"${amount}", f"{amount} USD"]
    words = [say_number(amount) + " dollars", say_number(amount)]
    return rng.choice(digits if rng.random() < 0.5 else words)


def format_years(n: int, rng: random.Random) -> str:
    """A duration in years: "12 years", "12 yrs", "12 yr", "12y"."""
    return rng.choice([f"{n} years", f"{n} yrs", f"{n} yr" if n == 1 else f"{n} yrs", f"{n}y"])


def format_miles(x: float, rng: random.Random) -> str:
    """A distance in miles: "2.3 miles", "2.3 mi", "2.3mi" (no conversion to km: that would not be exact).

    Extra forms: a decimal comma ("2,3 miles"), one decimal always ("5.0 mi"), words ("two point three miles").
    """
    usual = rng.choice([f"{x:g} miles", f"{x:g} mi", f"{x:g}mi", f"{x:g} mi."])
    whole, tenth = int(x), round(x * 10) % 10
    words = say_number(whole) + (f" point {ONES[tenth] or 'zero'}" if tenth else "")
    extra = [f"{x:.1f} mi", f"{words} miles", f"about {x:g} miles"]
    extra += [f"{x:g} miles".replace(".", ","), f"{x:g} mi".replace(".", ",")] if tenth else []
    return extra_form(extra) or usual


def format_feet(n: int, rng: random.Random) -> str:
    """A distance in feet: "1,200 ft", "1200 feet", "1200'", "1200ft" (+ "1200 ft.", "1,200ft", "1200 foot")."""
    usual = rng.choice([f"{n:,} ft", f"{n} feet", f"{n}'", f"{n}ft", f"{n:,} feet"])
    return extra_form([f"{n} ft.", f"{n:,}ft", f"{n} foot", f"approx. {n:,} feet"]) or usual


# --- extra forms, for the training split only ---
# More ways to write a number, a count, a flag. Each is drawn after the usual form, from a generator of
# its own, and replaces it in `--extra-forms` of the draws; so turning them on changes no other draw
# of a split. generate.py can turn them on for the training split only (augmentation): validation and
# test keep the usual forms, and results on them stay comparable with earlier data. Off by default:
# at 0.2 and 0.4 the demo read more stress facts right but decided worse on validation and stress
# (docs/results.md, 2026-12-06 session 18).
EXTRA_FORM_SHARE = 0.0
# Extra frames (other sentences around a fact, `EXTRA_FRAMES`) are on for half the training split's
# facts: over two training seeds, each with a control on the usual data, the demo recipe decided better
# on validation (0.81 -> 0.86) and stress (0.69 -> 0.76) (docs/results.md, session 22).
EXTRA_FRAME_SHARE = 0.5
EXTRA_PHRASES = {
    "prior_claims=0": ["no claims", "claims-free", "nil claims 5 yrs", "clean loss run", "loss run clean"],
    "prior_losses=0": ["no losses", "nil losses 5 yrs", "clean loss run", "loss run clean"],
    "prior_claims": ["loss run shows {n} {claims}", "{n} {claims} in the past five years"],
    "prior_losses": ["loss run shows {n} {losses}", "{n} {losses} in the past five years"],
    "sprinklered=True": ["sprinklers throughout", "full sprinkler coverage", "sprinklered 100%"],
    "sprinklered=False": ["no sprinkler system", "sprinklers: none", "no sprinkler protection"],
    "wiring_updated=True": ["electrical upgraded", "wiring redone", "elec updated"],
    "wiring_updated=False": ["elec original", "original electrical", "wiring orig."],
}
# More sentences around a fact ("he turned 51 this year", "they gross about $640k a year"): for the
# training split only, from the extra forms' generator family (`use_extra_forms(frames=...)`). Each
# fact's frames are "prose" (prose and non-native turns) or "terse" (notes and shorthand); an age fact
# keeps the unit of the usual template it replaces (a year or years), so the worksheet stays the same.
EXTRA_FRAMES = {
    "age": {
        "prose": [
            "she is {age}",
            "he turned {age} this year",
            "the insured is aged {age}",
            "the client is {age} years old now",
            "the date of birth is in {year}",
            "he was born back in {year}",
            "she is a {year} baby",
            "going by the ID, born in {year}",
        ],
        "terse": [
            "aged {age}",
            "{age} yrs old",
            "age: {age}",
            "{age} y.o.",
            "DOB {year}",
            "b. {year}",
            "birth yr {year}",
        ],
    },
    "face_amount": {
        "prose": [
            "they are looking for {money} of coverage",
            "he needs {money} in cover",
            "she is asking for a {money} policy",
            "the face would be {money}",
            "the sum insured they want is {money}",
        ],
        "terse": ["face amt {money}", "coverage {money}", "policy {money}", "sum insured {money}"],
    },
    "bmi": {
        "prose": ["the BMI comes in at {bmi}", "his BMI was measured at {bmi}", "her BMI is {bmi} per the paramed"],
        "terse": ["BMI: {bmi}", "bmi={bmi}", "BMI ~{bmi}", "ht/wt gives BMI {bmi}"],
    },
    "smoker=True": {
        "prose": ["he smokes cigarettes daily", "she is a regular smoker", "he still smokes, about ten a day"],
        "terse": ["smoker: Y", "current smoker", "tobacco - yes", "smokes daily"],
    },
    "smoker=False": {
        "prose": ["she has never smoked in her life", "he does not smoke", "no tobacco or nicotine of any kind"],
        "terse": ["smoker: N", "non-smoker (never)", "tobacco - no", "no tobacco"],
    },
    "medical_history=none": {
        "prose": ["his health is fine, no medical history to speak of", "she has no health issues at all"],
        "terse": ["med hx: none", "no medical history", "healthy, hx none"],
    },
    "medical_history": {
        "prose": ["medically, he {verb} {cond}", "on the health side she {verb} {cond}"],
        "terse": ["med hx: {cond}", "medical: {cond}"],
    },
    "occupation": {
        "prose": [
            "by trade the insured is {a_occ}",
            "she makes her living as {a_occ}",
            "he has worked as {a_occ} for years",
            "the client's job: {occ}",
            "day job is {occ}",
            "he is employed full time as {a_occ}",
        ],
        "terse": ["job: {occ}", "works as {a_occ}", "employed as {a_occ}", "occupation - {occ}", "{occ} by trade"],
    },
    "construction": {
        "prose": [
            "the house is {c} construction",
            "it's built of {c}",
            "the home is a {c} build",
            "the walls are {c}",
        ],
        "terse": ["constr: {c}", "{c} home", "built of {c}", "const. type {c}"],
    },
    "roof_age": {
        "prose": [
            "the roof went on in {year}",
            "they put a new roof on in {year}",
            "the roof has been up for {yrs}",
            "the current roof is about {yrs} old",
        ],
        "terse": ["roof yr {year}", "roof done {year}", "roof age {yrs}", "roof: {yrs} old"],
    },
    "fire_station_miles": {
        "prose": [
            "the fire department is {mi} down the road",
            "the closest firehouse is about {mi} away",
            "fire station distance is {mi}",
        ],
        "terse": ["FD dist {mi}", "fire dept {mi}", "firehouse {mi}", "station {mi}"],
    },
    "hydrant_feet": {
        "prose": [
            "a fire hydrant sits {ft} from the property",
            "the nearest hydrant is about {ft} away",
            "hydrant distance is {ft}",
        ],
        "terse": ["hydrant dist {ft}", "FH at {ft}", "hydrant approx {ft}"],
    },
    "prior_claims=0": {
        "prose": ["they have had no claims in the past five years", "no claims at all in five years"],
        "terse": ["claims (5y): 0", "no claims last 5 yrs", "0 claims"],
    },
    "prior_claims=1": {
        "prose": ["they had one claim in the past five years", "there was just 1 claim in five years"],
        "terse": ["claims (5y): 1", "1 claim last 5 yrs", "one claim"],
    },
    "prior_claims": {
        "prose": ["they had {n} claims in the past five years", "there were {n} claims over five years"],
        "terse": ["claims (5y): {n}", "{n} claims last 5 yrs", "{n} claims"],
    },
    "wind_zone=coastal": {
        "prose": ["the home is in the coastal wind zone", "it falls inside the coastal zone for wind"],
        "terse": ["coastal zone", "wind zone coastal", "zone: coastal"],
    },
    "wind_zone=inland": {
        "prose": ["the home is inland, away from the coast", "it is an inland property for wind"],
        "terse": ["inland zone", "wind zone inland", "zone: inland"],
    },
    "dwelling_value": {
        "prose": ["the dwelling should be insured for {money}", "they want {money} on the dwelling"],
        "terse": ["dwelling value {money}", "Cov A: {money}", "dwelling amt {money}"],
    },
    "occupancy": {
        "prose": [
            "the insured operates {a_occ}",
            "the business is run as {a_occ}",
            "it is {a_occ} on the ground floor",
            "the tenant is {a_occ}",
        ],
        "terse": ["operation - {occ}", "occupancy: {occ}", "type of business {occ}", "bus. type {occ}"],
    },
    "sprinklered=True": {
        "prose": ["the whole building has sprinklers", "they have a sprinkler system in every room"],
        "terse": ["sprinklers: Y", "sprinklered bldg", "full sprinklers"],
    },
    "sprinklered=False": {
        "prose": ["the building has no sprinklers", "there is no sprinkler system anywhere"],
        "terse": ["sprinklers: N", "no sprinklers at all", "sprinklers none"],
    },
    "building_age": {
        "prose": [
            "the building was finished in {year}",
            "the building dates from {year}",
            "the building was put up {yrs} ago",
            "the building is about {yrs} old",
        ],
        "terse": ["yr built {year}", "built in {year}", "bldg age {yrs}", "building {yrs} old"],
    },
    "wiring_updated=True": {
        "prose": ["the electrical was redone a few years back", "they had the building rewired recently"],
        "terse": ["elec: updated", "wiring: updated", "rewired recently"],
    },
    "wiring_updated=False": {
        "prose": ["the wiring is all original", "the electrical has never been updated"],
        "terse": ["elec: original", "wiring: orig", "wiring never updated"],
    },
    "annual_revenue": {
        "prose": ["they gross around {money} annually", "annual sales run {money}", "revenue last year was {money}"],
        "terse": ["sales {money}", "annual rev {money}", "revenue: {money}"],
    },
    "tiv": {
        "prose": ["the total insured value they want is {money}", "building and contents come to a TIV of {money}"],
        "terse": ["TIV: {money}", "total insured value {money}", "TIV = {money}"],
    },
    "prior_losses=0": {
        "prose": ["they have had no property losses in five years", "no losses at all in the past five years"],
        "terse": ["losses (5y): 0", "no losses last 5 yrs", "0 losses"],
    },
    "prior_losses=1": {
        "prose": ["they had one property loss in the past five years", "there was just 1 loss in five years"],
        "terse": ["losses (5y): 1", "1 loss last 5 yrs", "one loss"],
    },
    "prior_losses": {
        "prose": ["they had {n} property losses in the past five years", "there were {n} losses over five years"],
        "terse": ["losses (5y): {n}", "{n} losses last 5 yrs", "{n} losses"],
    },
}
# Mixed styles (training split only, `use_extra_forms(mix=...)`): in MIX_SHARE of the draws a fact of a
# sentence family is said with another sentence style's template ("NS" in an email, "the applicant does
# not smoke" in shorthand), and a table or dump row gets one of MIX_LABELS' field names, as people mix
# registers and every system names its fields its own way. Off by default: at 0.3, over two training seeds
# each paired with a control on the usual data, validation moved +4 / -1 conversations but stress fell at
# both (0.83 -> 0.73 and 0.77; stress facts lines right 26 -> 16 and 23 -> 22) (docs/results.md, session 26).
MIX_SHARE = 0.0
SENTENCE_STYLES = ("prose", "terse", "short", "nonnative")
MIX_LABELS = {
    "age": [("insured_age", "age"), ("applicant_age", "age"), ("age_yrs", "age"), ("birth_yr", "year"),
        ("yob", "year"), ("born", "year")],
    "face_amount": [("face_amount", "money"), ("coverage_amt", "money"), ("sum_insured", "money"),
        ("death_benefit", "money"), ("fa", "money")],
    "bmi": [("bmi_value", "bmi"), ("body_mass_index", "bmi")],
    "smoker": [("tobacco_use", "flag"), ("is_smoker", "flag"), ("nicotine", "flag"), ("smoking", "flag")],
    "medical_history": [("medical_history", "text"), ("pmh", "text"), ("health_hx", "text"), ("conditions", "text")],
    "occupation": [("job", "text"), ("occ", "text"), ("job_title", "text"), ("employment", "text")],
    "construction": [("const_type", "text"), ("constr", "text"), ("building_material", "text")],
    "roof_age": [("roof_age_yrs", "yrs"), ("roof_year", "year"), ("roof_replaced", "year"),
        ("roof_install_yr", "year")],
    "fire_station_miles": [("fire_station_miles", "x"), ("firestation_dist", "x"), ("dist_fire_station_mi", "x"),
        ("fire_dept_miles", "x"), ("fs_mi", "x")],
    "hydrant_feet": [("hydrant_dist_ft", "x"), ("nearest_hydrant", "ft"), ("hydrant_distance", "ft"),
        ("fire_hydrant_ft", "x")],
    "prior_claims": [("claims_count", "count"), ("num_claims_5y", "count"), ("prior_claims", "count"),
        ("loss_count_5y", "count")],
    "wind_zone": [("windzone", "text"), ("wind", "text"), ("wind_territory", "text")],
    "dwelling_value": [("cov_a", "money"), ("dwelling_limit", "money"), ("home_value", "money"),
        ("replacement_cost", "money")],
    "occupancy": [("business_type", "text"), ("occ_class", "text"), ("occupancy_desc", "text"), ("operations", "text")],
    "sprinklered": [("sprinklers", "flag"), ("sprinkler_system", "flag"), ("spr", "flag"), ("auto_sprinkler", "flag")],
    "building_age": [("yr_built", "year"), ("bldg_year", "year"), ("building_age_yrs", "yrs"),
        ("construction_year", "year")],
    "wiring_updated": [("electrical_updated", "flag"), ("wiring_upgraded", "flag"), ("elec_update", "flag"),
        ("rewired", "flag")],
    "annual_revenue": [("annual_sales", "money"), ("gross_revenue", "money"), ("sales", "money"),
        ("turnover", "money")],
    "tiv": [("total_insured_value", "money"), ("tiv_total", "money"), ("insured_value", "money")],
    "prior_losses": [("loss_count", "count"), ("losses", "count"), ("num_losses_5y", "count"),
        ("prior_losses", "count")],
}  # fmt: skip
# Submissions as brokers send them (training split only, `use_extra_forms(near=..., pending=...)`): most
# give all the facts but one or two, and a fact they lack is often named as still to come ("roof age to
# follow", a table row "Claims 5 yrs | TBD"); the generator's openings withheld 1-5 facts evenly and never
# named one. In NEAR_COMPLETE_SHARE of the conversations with asking turns the opening withholds only one
# fact per later broker turn; in PENDING_SHARE of them it names one withheld fact as pending. Off by
# default: at 0.5 / 0.3, over two training seeds each paired with a control on the usual data, stress asking
# turns decided too early less often (9 -> 5 of 88) but stress outcome stayed (0.74 -> 0.75) and validation
# fell (0.89 -> 0.83) (docs/results.md, session 29).
NEAR_COMPLETE_SHARE = 0.0
PENDING_SHARE = 0.0
# Hard amounts (training split only, `use_extra_forms(hard=...)`): in HARD_AMOUNT_SHARE of the draws a dollar
# amount is said as bare digits ("USD 11700000", "$1850000") or in words ("nineteen million two hundred fifty
# thousand dollars"), the two forms the demo read worst: converting them to thousands means dropping three
# zeros or composing the words (validation, four seed pairs: 9 of 52 and 15 of 40 wrong, against 2 of 220 in
# the other forms). Off by default: with NOISE_ROW_SHARE 0.5 beside it (`--hard-amounts 0.3 --noise-rows 0.5`),
# two seed pairs read words better (9 -> 6 of 20 wrong) but decided worse (validation 0.895 -> 0.875, stress 0.83 ->
# 0.79: docs/results.md, session 33).
HARD_AMOUNT_SHARE = 0.0
PENDING_NAMES = {
    "age": ["age", "date of birth"],
    "face_amount": ["face amount", "coverage amount"],
    "bmi": ["BMI", "height and weight"],
    "smoker": ["tobacco answer", "smoker status"],
    "medical_history": ["medical history", "health questions"],
    "occupation": ["occupation", "job details"],
    "construction": ["construction type", "construction"],
    "roof_age": ["roof age", "roof year"],
    "fire_station_miles": ["fire station distance", "fire protection details"],
    "hydrant_feet": ["hydrant distance", "hydrant info"],
    "prior_claims": ["claims history", "loss runs"],
    "wind_zone": ["wind zone", "wind zone check"],
    "dwelling_value": ["dwelling value", "Coverage A amount"],
    "occupancy": ["occupancy", "business description"],
    "sprinklered": ["sprinkler info", "sprinkler status"],
    "building_age": ["year built", "building age"],
    "wiring_updated": ["electrical info", "wiring update details"],
    "annual_revenue": ["revenue figure", "annual revenue"],
    "tiv": ["TIV", "total insured value"],
    "prior_losses": ["loss runs", "loss history"],
}
PENDING_SENTENCES = {
    "prose": [
        "the {name} is still to follow",
        "we are still waiting on the {name}",
        "I will send the {name} once I have it",
    ],
    "terse": ["{name} to follow", "{name}: pending", "{name} tbd", "{name} - waiting on client"],
}
PENDING_VALUES = ("TBD", "pending", "to follow", "waiting on client")
_extra = {
    **{"rng": random.Random(0), "share": 0.0, "frames_rng": random.Random(0), "frames": 0.0},
    **{"mix_rng": random.Random(0), "mix": 0.0, "shape_rng": random.Random(0), "near": 0.0, "pending": 0.0},
    **{"hard_rng": random.Random(0), "hard": 0.0, "noise_rng": random.Random(0), "noise": 0.0},
}


def use_extra_forms(
    seed: str,
    share: float,
    frames: float = 0.0,
    mix: float = 0.0,
    near: float = 0.0,
    pending: float = 0.0,
    hard: float = 0.0,
    noise: float = 0.0,
) -> None:
    """From now on, say a fact in an extra form in `share` of the draws (0 turns them off).

    Args:
        seed: seeds the extra forms' own generators.
        share: the chance that a number, count or flag is said in an extra form.
        frames: the chance that a fact of a sentence family is said in an extra frame (`EXTRA_FRAMES`).
        mix: the chance that a fact is said in another style's template or under another field name
            (`MIX_LABELS`).
        near: the chance that an opening withholds only one fact per later broker turn (`NEAR_COMPLETE_SHARE`).
        pending: the chance that an opening names one fact it withholds as pending (`PENDING_SHARE`).
        hard: the chance that an amount is said as bare digits or in words (`HARD_AMOUNT_SHARE`).
        noise: the chance that a table or dump turn carries rows the rulebook does not read (`NOISE_ROW_SHARE`).
    """
    _extra["rng"], _extra["share"] = random.Random(seed), share
    _extra["frames_rng"], _extra["frames"] = random.Random(f"{seed}-frames"), frames
    _extra["mix_rng"], _extra["mix"] = random.Random(f"{seed}-mix"), mix
    _extra["shape_rng"], _extra["near"], _extra["pending"] = random.Random(f"{seed}-shape"), near, pending
    _extra["hard_rng"], _extra["hard"] = random.Random(f"{seed}-hard"), hard
    _extra["noise_rng"], _extra["noise"] = random.Random(f"{seed}-noise"), noise


def near_complete_drawn() -> bool:
    """True in the near-complete share of the openings (no draw while it is off)."""
    return _extra["near"] > 0 and _extra["shape_rng"].random() < _extra["near"]


def pending_drawn(withheld: list[str]) -> list[str]:
    """[one withheld fact] to name as pending in the pending share of the openings, else [] (no draw while off)."""
    if not withheld or _extra["pending"] <= 0 or _extra["shape_rng"].random() >= _extra["pending"]:
        return []
    return [_extra["shape_rng"].choice(withheld)]


def pending_mention(key: str, style: str) -> str | tuple[str, str]:
    """A fact named as still to come: a phrase for a sentence style, a (label, value) row for "table"/"kv"."""
    rng = _extra["shape_rng"]
    if style in ("table", "kv"):
        return rng.choice(FIELD_LABELS[key][style])[0], rng.choice(PENDING_VALUES)
    sentences = PENDING_SENTENCES["prose" if style in ("prose", "nonnative") else "terse"]
    return rng.choice(sentences).format(name=rng.choice(PENDING_NAMES[key]))


def _mix_drawn() -> bool:
    """True in the mixed share of the draws (one draw of the mixed styles' generator while they are on)."""
    return _extra["mix"] > 0 and _extra["mix_rng"].random() < _extra["mix"]


def mixed_template(templates: dict[str, list[str]], style: str) -> str | None:
    """A template of another sentence style in the mixed share of the draws, else None (`MIX_SHARE`)."""
    if style not in SENTENCE_STYLES or not _mix_drawn():
        return None
    other = _extra["mix_rng"].choice([name for name in SENTENCE_STYLES if name != style])
    return _extra["mix_rng"].choice(templates[other])


def mixed_label(key: str, style: str) -> tuple[str, str] | None:
    """Another (field name, kind) of a table or dump row in the mixed share of the draws, else None."""
    if not _mix_drawn():
        return None
    label, kind = _extra["mix_rng"].choice(MIX_LABELS[key])
    return (label[:1].upper() + label[1:].replace("_", " ") if style == "table" else label), kind


def extra_form(options: list[str]) -> str | None:
    """One of `options` in the extra-form share of the calls, else None (no draw while they are off)."""
    if _extra["share"] <= 0 or not options:
        return None
    return _extra["rng"].choice(options) if _extra["rng"].random() < _extra["share"] else None


def extra_phrase(key: str, value: object) -> str | None:
    """An extra way to say a count or a flag (`EXTRA_PHRASES`), or a claims list by year; None if not drawn."""
    if _extra["share"] <= 0:
        return None
    if key in ("prior_claims", "prior_losses"):
        noun = ("claim" if key == "prior_claims" else "loss") + (
            "" if value == 1 else "es" if key == "prior_losses" else "s"
        )
        templates = EXTRA_PHRASES.get(f"{key}={value}") or EXTRA_PHRASES[key]
        by_year = claims_by_year(key, value, "terse", _extra["rng"])
        options = [t.format(n=value, claims=noun, losses=noun) for t in templates] + [by_year] * len(templates)
        return extra_form(options)
    return extra_form(EXTRA_PHRASES.get(f"{key}={value}", []))


def extra_frame(key: str, value: object, style: str, year_form: bool) -> str | None:
    """Another sentence around the fact (`EXTRA_FRAMES`) in the extra-frame share of the draws, else None.

    An age fact keeps its unit: a frame with a year where the usual template said a year (`year_form`).
    """
    frames = EXTRA_FRAMES.get(f"{key}={value}") or EXTRA_FRAMES.get(key)
    if _extra["frames"] <= 0 or not frames or style not in ("prose", "nonnative", "terse", "short"):
        return None
    options = frames["terse" if style in ("terse", "short") else "prose"]
    if key in ("age", "roof_age", "building_age"):
        options = [frame for frame in options if ("{year}" in frame) == year_form]
    rng = _extra["frames_rng"]
    if not options or rng.random() >= _extra["frames"]:
        return None
    return rng.choice(options).format(**value_fields(key, value, rng))


def claims_by_year(key: str, count: int, style: str, rng: random.Random) -> str:
    """Claims (or losses) listed by year, often one of them outside the five-year window.

    Only the years from REFERENCE_YEAR - 4 on count toward the fact: `count` of them, plus (always
    when `count` is 0, else in OLD_CLAIM_SHARE of the lists) one year at least 7 years back that the
    reader must leave out.
    """
    inside = sorted(rng.sample(range(YEAR - 4, YEAR + 1), count))
    outside = [rng.randint(YEAR - 13, YEAR - 7)] if count == 0 or rng.random() < OLD_CLAIM_SHARE else []
    years = sorted([*outside, *inside])
    items = [f"{y} ({rng.choice(CLAIM_CAUSES)})" for y in years]
    noun = "claims" if key == "prior_claims" else "losses"
    listed = ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else items[0]
    templates = {
        "prose": [f"the {noun} on record are {listed}", f"{noun} by year: {listed}"],
        "terse": [f"{noun}: {', '.join(items)}", f"{noun} {', '.join(map(str, years))}"],
        "short": [f"{noun[:4]} {', '.join(map(str, years))}", f"{noun} yrs {'/'.join(map(str, years))}"],
        "nonnative": [f"they had {noun} in {listed}"],
        "table": [", ".join(items)],
        "kv": ["[" + ", ".join(map(str, years)) + "]"],
    }
    return rng.choice(templates[style])


def name_variant(value: str, name: str, rng: random.Random) -> str:
    """`name`, or in NAME_VARIANT_SHARE of the calls another word people use for `value` ("RN" for nurse)."""
    return rng.choice(NAME_VARIANTS[value]) if rng.random() < NAME_VARIANT_SHARE else name


def value_fields(key: str, value: object, rng: random.Random) -> dict:
    """The template fields of one fact: its value in every form a template may ask for."""
    fields = {"age": value, "bmi": value, "n": value, "occ": value, "x": value}
    if key == "bmi":
        fields["bmi"] = extra_form([f"{value}".replace(".", ",")]) or value
    if key == "fire_station_miles":
        fields["x"], fields["mi"] = f"{value:g}", format_miles(value, rng)
    elif key in ("face_amount", "dwelling_value", "annual_revenue", "tiv"):
        fields["money"] = format_money_varied(value, rng)
    elif key in ("age", "roof_age", "building_age"):
        fields["year"], fields["yrs"] = YEAR - value, format_years(value, rng)
    elif key == "hydrant_feet":
        fields["x"], fields["ft"] = f"{value:,}", format_feet(value, rng)
    elif key in ("prior_claims", "prior_losses"):
        fields["n"] = rng.choice([str(value), NUMBER_WORDS[value]])
    elif key in ("occupation", "occupancy"):
        fields["occ"] = name_variant(value, value, rng)
        fields["a_occ"] = ("an " if fields["occ"][0] in "aeiouAEIOU" else "a ") + fields["occ"]
        fields["hazard"] = rulebook.OCCUPANCY_HAZARD.get(value, "")
    elif key == "construction":
        fields["c"] = name_variant(value, rng.choice(CONSTRUCTION_NAMES[value]), rng)
    elif key == "medical_history" and value != "none":
        year = rng.randint(YEAR - 4, YEAR - 1)
        fields["cond"] = rng.choice(CONDITION_EXAMPLES[value]).format(year=year)
        fields["verb"] = "has" if value == "controlled" else "had"
    return fields


def render_fact(key: str, value: object, style: str, rng: random.Random, year_keys: set[str]) -> str:
    """Say one fact with a random template and number format.

    Args:
        key: the fact name, e.g. "face_amount".
        value: its value, e.g. 250000.
        style: "prose", "terse", "short", "nonnative" or "form" (sentences to "Label: value").
        rng: the split's random generator.
        year_keys: an age fact said as a year ("born 1983") is added to it, one said as an age is
            removed (the last mention wins, so a corrected fact keeps the unit of its correction).

    Returns:
        e.g. "they want a quarter million of cover", "face 250k" or "Face amount: $250,000".
    """
    if key in ("prior_claims", "prior_losses") and style != "form" and rng.random() < CLAIMS_BY_YEAR_SHARE:
        usual = claims_by_year(key, value, style, rng)
    else:
        templates = PHRASES.get(f"{key}={value}") or PHRASES[key]
        if key == "occupancy" and rng.random() < OCCUPANCY_HAZARD_SHARE:
            templates = OCCUPANCY_WITH_HAZARD
        template = rng.choice(templates[style])
        template = mixed_template(templates, style) or template
        if key in ("age", "roof_age", "building_age"):
            (year_keys.add if "{year}" in template else year_keys.discard)(key)
        usual = template.format(**value_fields(key, value, rng))
        usual = extra_frame(key, value, style, key in year_keys) or usual
    return (style != "form" and extra_phrase(key, value)) or usual


def render_field(key: str, value: object, style: str, rng: random.Random, year_keys: set[str]) -> tuple[str, str]:
    """One fact as a (label, value) pair of a table ("table") or key/value dump ("kv")."""
    label, kind = rng.choice(FIELD_LABELS[key][style])
    label, kind = mixed_label(key, style) or (label, kind)
    if key in ("prior_claims", "prior_losses") and rng.random() < CLAIMS_BY_YEAR_SHARE:
        return label.replace(" 5 yrs", "").replace("_5y", "_years"), claims_by_year(key, value, style, rng)
    if key in ("age", "roof_age", "building_age"):
        (year_keys.add if kind == "year" else year_keys.discard)(key)
    fields = value_fields(key, value, rng)
    if kind == "flag":
        text = rng.choice(["yes", "Y", "true"] if value else ["no", "N", "false"])
    elif kind == "text":
        text = {"none": "none", "inland": "inland", "coastal": "coastal"}.get(value, "")
        text = text or fields.get("cond") or fields.get("c") or str(fields["occ"])
        if key == "occupancy" and rng.random() < OCCUPANCY_HAZARD_SHARE:
            text = f"{text} ({fields['hazard']} hazard)"
    elif kind in ("money", "yrs", "mi", "ft", "year"):
        text = str(fields[kind])
    elif kind == "count":
        text = str(value)
    else:
        text = str(fields[kind])
    if style == "kv" and kind == "money" and rng.random() < 0.5:
        text = str(value)
    return label, text


def join_items(items: list[str]) -> str:
    """Join ["a", "b", "c"] as "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def capitalize(text: str) -> str:
    """Upper-case the first letter only ("the BMI" -> "The BMI")."""
    return text[:1].upper() + text[1:]


def add_typos(text: str, rng: random.Random, rate: float = 0.15) -> str:
    """Swap two inner letters of some longer words: filler text only, never a fact."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) > 4 and word.isalpha() and rng.random() < rate:
            j = rng.randrange(1, len(word) - 2)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def distractor(rng: random.Random) -> str:
    """A sentence with numbers that are not facts: a phone, a date, a street or a policy number."""
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    phone = f"({rng.randint(201, 989)}) 555-{rng.randint(100, 9999):04d}"
    street = f"{rng.randint(12, 9870)} {rng.choice(['Oak', 'Harbor', 'Maple', 'Mill', 'Cedar'])} {rng.choice(['St', 'Ave', 'Rd'])}"
    policy = f"{rng.choice(['POL', 'HB', 'QT', 'REF'])}-{rng.randint(10000, 99999)}"
    return rng.choice(
        [
            f"Call me on {phone} if anything is unclear.",
            f"Our ref is {policy}, please quote it back.",
            f"The mailing address is {street}.",
            f"They want it bound by {month}/{day}/{YEAR}.",
            f"Prior carrier was Northfield, account {policy}.",
            f"I'm out of office from {month}/{day} to {month}/{day + 2}, reach my colleague on {phone}.",
            f"Met them at the {street} office on {month}/{day}.",
        ]
    )


STORIES = (
    "Long week here, we had {k} renewals land on my desk at once.",
    "The client is a friend of a friend, lovely people, they brought us {k} dozen cookies last Christmas.",
    "Their daughter just started university, so they are sorting out all their paperwork.",
    "They have been with our agency since we opened, so I'd love to keep them happy.",
    "We spoke for almost an hour, mostly about their dog and their trip to the mountains in {m}.",
    "Sorry for the delay, our office moved to floor {f} and the phones were down.",
)


NAMES = ("Dana", "Sam", "Priya", "Marco", "Lena", "Tom")


def fill_story(story: str, rng: random.Random) -> str:
    """One filler sentence of a long email, with a number or two that are not facts."""
    month = rng.choice(["March", "June", "August", "October"])
    return story.format(k=rng.randint(2, 14), m=month, f=rng.randint(2, 9))


def write_table(rows: list[tuple[str, str]], rng: random.Random) -> str:
    """A plain-text table of (label, value) rows, in one of three layouts."""
    width = max(len(label) for label, _ in rows)
    layout = rng.randrange(3)
    if layout == 0:
        lines = [f"{'Item'.ljust(width)} | Detail", f"{'-' * width}-+-------"]
        return "\n".join(lines + [f"{label.ljust(width)} | {value}" for label, value in rows])
    if layout == 1:
        return "\n".join(f"{label.ljust(width)}   {value}" for label, value in rows)
    return "\n".join(f"| {label} | {value} |" for label, value in rows)


def write_dump(rows: list[tuple[str, str]], rng: random.Random) -> str:
    """A key/value dump: key=value lines, "key: value" lines or a JSON-like object."""
    layout = rng.randrange(3)
    if layout == 0:
        return "\n".join(f"{key}={value}" for key, value in rows)
    if layout == 1:
        return "\n".join(f"{key.upper()}: {value}" for key, value in rows)
    return "{" + ", ".join(f'"{key}": "{value}"' for key, value in rows) + "}"


def change_case(text: str, rng: random.Random) -> str:
    """Shorthand and call notes are often typed all in lower or upper case."""
    draw = rng.random()
    return text.upper() if draw < 0.2 else text.lower() if draw < 0.4 else text


def write_user_turn(
    lob: str,
    keys: list[str],
    facts: dict,
    family: str,
    rng: random.Random,
    opening: bool,
    year_keys: set[str],
    corrected: tuple[str, ...] = (),
    pending: Sequence[str] = (),
) -> str:
    """Write a broker turn that states some facts in the style of a phrasing family.

    Args:
        lob: line of business (named in an opening turn).
        keys: the facts to state, in this order.
        facts: the values to state (the wrong value of a fact corrected later, in an opening turn).
        family: one of SEEN_FAMILIES + HELD_OUT_FAMILIES.
        rng: the split's random generator.
        opening: True for the submission that opens the chat, False for an answer to a question.
        year_keys: collects the age facts said as a year (see `render_fact`).
        corrected: facts said wrong in an earlier turn, restated here with their right value.
        pending: facts not given that the turn names as still to come (`pending_mention`).

    Returns:
        The message content.
    """
    lob_name = rng.choice(LOB_NAMES[lob])
    style = FAMILY_STYLE[family]
    if style in ("table", "kv"):
        rows = [render_field(k, facts[k], style, rng, year_keys) for k in keys]
        rows += [pending_mention(k, style) for k in pending]
        fixes = [render_field(k, facts[k], style, rng, year_keys) for k in corrected]
        return write_structured(family, lob_name, rows, fixes, rng, opening)
    said = [render_fact(k, facts[k], style, rng, year_keys) for k in keys]
    said += [pending_mention(k, style) for k in pending]
    fixes = [render_fact(k, facts[k], style, rng, year_keys) for k in corrected]
    return WRITERS[family](lob_name, said, fixes, rng, opening)


def _amount(low: int, high: int, step: int) -> Callable[[random.Random], str]:
    return lambda r: f"${r.randint(low, high) * step:,}"


# Noise rows (training split only, `use_extra_forms(noise=...)`): forms carry fields the rulebook does not read
# (stories, protection class, a premium estimate, a payroll, a deductible), some of them dollar amounts. In
# NOISE_ROW_SHARE of the table and dump turns, 1-3 of them sit among the facts: a reader must take the
# dwelling from "Cov A", not from "Premium est", and must not count them as facts given. Off by default: tried
# with HARD_AMOUNT_SHARE, not kept (docs/results.md, session 33).
NOISE_ROW_SHARE = 0.0
NOISE_ROWS = {
    "home": [
        ("Stories", "stories", lambda r: str(r.randint(1, 3))),
        ("Prot. class", "prot_class", lambda r: str(r.randint(1, 9))),
        ("Sq ft", "sq_ft", lambda r: f"{r.randint(9, 42) * 100:,}"),
        ("Premium est", "premium_est", lambda r: f"${r.randint(600, 4200):,}.{r.randint(0, 99):02d}"),
        ("Deductible", "deductible", lambda r: f"${r.choice([500, 1000, 2500, 5000]):,}"),
        ("Year purchased", "purchase_yr", lambda r: str(r.randint(1985, 2024))),
        ("Bedrooms", "bedrooms", lambda r: str(r.randint(2, 5))),
    ],
    "life": [
        ("Term", "term_yrs", lambda r: f"{r.choice([10, 15, 20, 30])} years"),
        ("Beneficiary", "beneficiary", lambda r: r.choice(["spouse", "children", "estate", "trust"])),
        ("Annual income", "income", _amount(35, 240, 1000)),
        ("Premium mode", "premium_mode", lambda r: r.choice(["monthly", "annual", "quarterly"])),
        ("Height", "height_in", lambda r: str(r.randint(60, 76))),
        ("Policy #", "policy_no", lambda r: f"TL-{r.randint(10000, 99999)}"),
    ],
    "business": [
        ("Employees", "employees", lambda r: str(r.randint(2, 60))),
        ("Sq ft", "sq_ft", lambda r: f"{r.randint(12, 180) * 100:,}"),
        ("Years in business", "yrs_in_business", lambda r: str(r.randint(1, 40))),
        ("Deductible", "deductible", lambda r: f"${r.choice([1000, 2500, 5000, 10000]):,}"),
        ("Payroll", "payroll", _amount(80, 2400, 1000)),
        ("Stories", "stories", lambda r: str(r.randint(1, 4))),
    ],
}


def noise_rows(lob_name: str, family: str) -> list[tuple[str, str]]:
    """1-3 rows the rulebook does not read, in the noise share of the table and dump turns (`NOISE_ROW_SHARE`)."""
    rng = _extra["noise_rng"]
    if _extra["noise"] <= 0 or rng.random() >= _extra["noise"]:
        return []
    kind = "life" if "life" in lob_name else "home" if "home" in lob_name else "business"
    picks = rng.sample(NOISE_ROWS[kind], rng.randint(1, 3))
    return [(label if family == "fwd_table" else key, values(rng)) for label, key, values in picks]


def write_structured(family: str, lob_name: str, rows: list, fixes: list, rng: random.Random, opening: bool) -> str:
    """fwd_table and kv_export turns: a header, then the rows as a table or a dump (noise rows among them)."""
    rows = [*rows]
    for row in noise_rows(lob_name, family):
        rows.insert(_extra["noise_rng"].randrange(len(rows) + 1), row)
    if family == "fwd_table":
        fixed = [(f"{label} (corrected)", value) for label, value in fixes]
        body = write_table(rows + fixed, rng) if rows or fixed else ""
        if not opening:
            head = rng.choice(["Filled in the rest:", "Here you go, updated sheet:", "From the agent's file:"])
            return f"{head}\n{body}"
        sender = rng.choice(NAMES)
        return (
            f"---------- Forwarded message ---------\nFrom: {sender} <{sender.lower()}@harborbrokers.com>\n"
            f"Subject: {lob_name} submission\n{distractor(rng)}\n\n{add_typos('See the notes below, thanks', rng)}\n\n"
            + body
        )
    fixed = [(f"{key}_corrected", value) for key, value in fixes]
    body = write_dump(rows + fixed, rng)
    if opening:
        return rng.choice([f"line={lob_name}\n", f"# {lob_name} export\n", f"LOB: {lob_name}\n"]) + body
    return body


def write_prose(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """broker_email: polite sentences, one fact each."""
    sentences = [capitalize(s) + "." for s in said]
    sentences += [rng.choice(["Correction to my earlier note: ", "Sorry, I sent one wrong: "]) + f + "." for f in fixes]
    if opening:
        head = rng.choice(
            [f"Dear underwriter, please review this {lob_name} submission.", f"Hello, a new {lob_name} application."]
        )
        return f"{head} {' '.join(sentences)}{rng.choice(['', ' Kind regards.', ' Many thanks.'])}"
    return f"{rng.choice(['Certainly.', 'Of course.', 'Thank you.'])} {' '.join(sentences)}"


def write_bullets(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """bullet_notes: one fact per bullet (or "; " in a reply)."""
    lines = said + [f"correction: {f}" for f in fixes]
    if opening:
        head = rng.choice([f"{lob_name} sub:", f"New {lob_name} risk", f"{lob_name.upper()} - quote req"])
        return head + "\n- " + "\n- ".join(lines)
    return "- " + "\n- ".join(lines) if rng.random() < 0.5 else "; ".join(lines)


def write_chatty(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """chatty_agent: one run-on sentence."""
    text = capitalize(join_items(said)) + "." if said else ""
    text += "".join(f" Oh wait, I got one wrong: {f}." for f in fixes)
    if opening:
        head = rng.choice([f"Hi! Got a {lob_name} one for you.", f"Hey, quick {lob_name} quote.", "Morning!"])
        return f"{head} {text}"
    return f"{rng.choice(['Sure!', 'Yep.', 'Just checked.', 'Oh, right.'])} {text.strip()}"


def write_shorthand(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """uw_shorthand: abbreviations, few words, often all lower or upper case."""
    items = said + [rng.choice(["corr: ", "*fix: ", "correction - "]) + f for f in fixes]
    text = rng.choice([", ", " / ", "; ", "\n"]).join(items)
    if opening:
        text = rng.choice([f"{lob_name} - ", f"new {lob_name}: ", "pls quote: "]) + text
    return change_case(text, rng)


def write_long_email(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """long_email: stories and numbers that are not facts between the fact sentences."""
    sentences = [capitalize(s) + "." for s in said]
    for story in rng.sample(STORIES, rng.randint(1, 2)):
        sentences.insert(rng.randrange(len(sentences) + 1), add_typos(fill_story(story, rng), rng))
    sentences.insert(rng.randrange(len(sentences) + 1), distractor(rng))
    sentences += [f"One more thing, I had it wrong before: {f}." for f in fixes]
    if opening:
        head = rng.choice(
            [f"Hi there, hope your week is going well! I have a {lob_name} case for you.", "Good morning,"]
        )
        tail = rng.choice(["Thanks so much, talk soon!", "Best, Dana", "Cheers and have a good weekend."])
        return f"{head}\n\n{' '.join(sentences)}\n\n{tail}"
    return f"{rng.choice(['Hi again,', 'Sorry, missed those!', 'Here you go.'])} {' '.join(sentences)}"


def write_call_log(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """call_log: pasted notes of a phone call, with the time and the caller's number."""
    clock = f"{rng.randint(8, 17)}:{rng.randint(0, 59):02d}"
    lines = [f"* {s}" for s in said] + [f"* correction from broker: {f}" for f in fixes]
    if opening:
        phone = f"555-{rng.randint(100, 9999):04d}"
        head = f"Call notes {clock} - {lob_name}, broker {rng.choice(NAMES)} (cb {phone})"
        return change_case("\n".join([head, *lines, f"* {distractor(rng)}"]), rng)
    return change_case("\n".join([f"Follow-up call {clock}:", *lines]), rng)


def write_colleague_chat(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """colleague_chat: a pasted chat between colleagues, one fact a message."""
    broker, colleague = rng.sample(NAMES, 2)
    hour, minute = rng.randint(8, 17), rng.randint(0, 50)
    lines = []
    if opening:
        lines.append(f"[{hour}:{minute:02d}] {broker}: {lob_name} one from Harbor, can you look?")
        lines.append(f"[{hour}:{minute:02d}] {colleague}: sure, what do we have")
    for offset, text in enumerate(said, start=1):
        lines.append(f"[{hour}:{minute + offset:02d}] {broker}: {text}")
    if opening or rng.random() < 0.4:
        lines.append(f"[{hour}:{minute + 9:02d}] {colleague}: {distractor(rng).lower()}")
    lines += [f"[{hour}:{minute + 9:02d}] {broker}: wait no, {f}" for f in fixes]
    return "\n".join(lines)


def write_non_native(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """non_native: English as a second language, simple sentences."""
    sentences = [capitalize(s) + "." for s in said]
    sentences += [f"Sorry, I make mistake before: {f}." for f in fixes]
    if opening:
        head = rng.choice(
            [f"Hello dear underwriter, I send you one {lob_name} case.", f"Good day. Here is {lob_name}."]
        )
        return f"{head} {' '.join(sentences)} {rng.choice(['Thank you in advance.', 'Waiting your answer.'])}"
    return f"{rng.choice(['Yes, here.', 'Ok, I check.', 'Please find:'])} {' '.join(sentences)}"


def write_form(lob_name: str, said: list[str], fixes: list[str], rng: random.Random, opening: bool) -> str:
    """form_fields (held out): "Label: value" fields separated by bars."""
    fields = " | ".join(said + [f"Corrected {f}" for f in fixes])
    return f"SUBMISSION | Line: {lob_name} | {fields}" if opening else f"UPDATE | {fields}"


WRITERS = {
    "broker_email": write_prose,
    "bullet_notes": write_bullets,
    "chatty_agent": write_chatty,
    "uw_shorthand": write_shorthand,
    "long_email": write_long_email,
    "call_log": write_call_log,
    "colleague_chat": write_colleague_chat,
    "non_native": write_non_native,
    "form_fields": write_form,
}


def wrong_value(key: str, value: object, rng: random.Random) -> object:
    """A plausible wrong value for a fact, said first and corrected in a later turn (never the right one)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        options = {
            "medical_history": rulebook.MEDICAL_HISTORIES,
            "construction": rulebook.CONSTRUCTION_TYPES,
            "wind_zone": rulebook.WIND_ZONES,
            "occupation": sorted(rulebook.LIFE_OCCUPATIONS),
            "occupancy": sorted(rulebook.OCCUPANCY_HAZARD),
        }[key]
        return rng.choice([option for option in options if option != value])
    if key == "bmi":
        return round(value + rng.choice([-1, 1]) * rng.uniform(1.0, 5.0), 1)
    if key == "fire_station_miles":
        return round(max(0.2, value + rng.choice([-1, 1]) * rng.uniform(0.5, 3.0)), 1) or 0.2
    step = {"hydrant_feet": 100, "face_amount": 50_000, "dwelling_value": 50_000, "annual_revenue": 50_000}
    step |= {"tiv": 50_000, "prior_claims": 1, "prior_losses": 1}
    low = {"prior_claims": 0, "prior_losses": 0, "age": 18}.get(key, step.get(key, 1))
    high = {"prior_claims": 4, "prior_losses": 4}.get(key, 10**9)
    shifted = [value + sign * k * step.get(key, 1) for sign in (-1, 1) for k in range(1, 6)]
    return rng.choice([v for v in shifted if low <= v <= high])
