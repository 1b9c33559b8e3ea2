"""Count where the finetuned model's worksheets go wrong, step by step, in evaluate.py's predictions.

Reads a predictions.jsonl written by evaluate.py (reference and generated final replies) and
compares them line by line: each fact of the Facts line, each check line's comparison (the numbers
copied), its answer (the effect of a rule that fires, else "no"), its running result (against
the reference, and against the model's own previous result and answer; a line without "->" carries
the previous result on), and whether the DECISION line follows the model's own last result.
Use it on the validation split when choosing a recipe or a data format:

    python evaluate.py --adapter runs/exp/best --split validation --no-base --no-extra-prompts
    python data/worksheet_errors.py runs/exp/eval/predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.task import parse_decision_line

# "L-4 age 54 >= 50 yes, face $1500k > $1000k yes: refer -> refer L-4", or without the ": ..." tail;
# an approval's condition sits after the effect: ": standard, condition roof inspection ... -> ...".
CHECK_LINE = re.compile(r"([LHB]-\d+) (.*?)(?:: (\w+)(?:, condition [^\n]*?)? -> (.*))?")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictions", type=Path, help="predictions.jsonl from evaluate.py")
    parser.add_argument("--key", default="generated_finetuned", help="field holding the generated reply")
    parser.add_argument("--show", type=int, default=0, help="print the first N replies with a wrong decision")
    return parser.parse_args(argv)


def parse_worksheet(text: str) -> tuple[list[str], list[tuple[str, str, str, str | None]]]:
    """Split a worksheet into its facts and its check lines.

    Args:
        text: a final reply.

    Returns:
        (facts, checks): the "; "-separated items of the Facts line (empty when missing) and, per
        check line, (rule id, comparison, answer, running result): the answer is the effect of a
        rule that fires and "no" for one that does not, whose running result is None (not written).
    """
    lines = text.splitlines()
    facts = lines[0].removeprefix("Facts: ").rstrip(".").split("; ") if lines and lines[0].startswith("Facts: ") else []
    checks = []
    for line in lines:
        if match := CHECK_LINE.fullmatch(line):
            rule_id, comparison, effect, result = match.groups()
            checks.append((rule_id, comparison, effect or "no", result))
    return facts, checks


def next_result(previous: str, rule_id: str, answer: str) -> str:
    """The running result after one check, computed from the previous result and the answer."""
    if answer == "no":
        return previous
    return f"{answer} {rule_id}" if previous == "none" else f"{previous}, {rule_id}"


def decision_from_result(result: str) -> tuple[str, str, list[str]] | None:
    """The (outcome, class, rules) a last running result implies; None for "none" (the grant rule)."""
    if result == "none":
        return None
    label, _, rules = result.partition(" ")
    outcome, risk_class = (label, "n/a") if label in ("decline", "refer") else ("approve", label)
    return outcome, risk_class, rules.split(", ")


def score(records: list[dict], key: str) -> Counter:
    """Count the right steps of every worksheet.

    Args:
        records: evaluate.py prediction records.
        key: the field holding the generated reply.

    Returns:
        A Counter of step names -> how often right (and the totals under "n_..." names).
    """
    counts: Counter = Counter()
    for record in records:
        ref_facts, ref_checks = parse_worksheet(record["reference"])
        facts, checks = parse_worksheet(record[key])
        counts["n_replies"] += 1
        counts["facts line right"] += facts == ref_facts
        for index, item in enumerate(ref_facts):
            name = item.split(" ")[0]
            counts[f"n_fact {name}"] += 1
            counts[f"fact {name}"] += index < len(facts) and facts[index] == item
        counts["all checks present"] += [c[0] for c in checks] == [c[0] for c in ref_checks]
        previous, ref_previous, consistent = "none", "none", True
        for check, ref in zip(checks, ref_checks, strict=False):
            counts["n_checks"] += 1
            counts["comparison copied right"] += check[:2] == ref[:2]
            counts["answer right"] += check[2] == ref[2]
            if check[3] is not None:
                follows = check[3] == next_result(previous, check[0], check[2])
                counts["n_results"] += 1
                counts["result follows own answer"] += follows
                consistent &= follows
            previous = check[3] or previous
            ref_previous = ref[3] or ref_previous
            counts["result right"] += previous == ref_previous
        counts["every result follows its answers"] += bool(checks) and consistent
        counts["all answers right"] += bool(checks) and [c[2] for c in checks] == [c[2] for c in ref_checks]
        decision = parse_decision_line(record[key])
        if checks and decision is not None:
            implied = decision_from_result(next((c[3] for c in reversed(checks) if c[3]), "none"))
            own = (decision["outcome"], decision["risk_class"], decision["rules"])
            counts["DECISION follows own last result"] += (implied is None and own[:2] == ("approve", "preferred")) or (
                implied == own
            )
        reference = record["reference_decision"]
        counts["outcome right"] += decision is not None and decision["outcome"] == reference["outcome"]
    return counts


def main(argv: list[str] | None = None) -> None:
    """Print the step counts of one predictions file (and optionally some wrong replies)."""
    args = parse_args(argv)
    records = [json.loads(line) for line in args.predictions.read_text().splitlines() if line.strip()]
    counts = score(records, args.key)
    replies, checks = counts["n_replies"], counts["n_checks"]
    print(f"{args.predictions}: {replies} replies, {checks} check lines")
    for name in ("facts line right", "all checks present", "all answers right", "every result follows its answers"):
        print(f"  {name:40s} {counts[name]:4d} / {replies}")
    for name in ("DECISION follows own last result", "outcome right"):
        print(f"  {name:40s} {counts[name]:4d} / {replies}")
    for name in ("comparison copied right", "answer right", "result right"):
        print(f"  check: {name:33s} {counts[name]:4d} / {checks}")
    followed, written = counts["result follows own answer"], counts["n_results"]
    print(f"  check: {'result follows own answer':33s} {followed:4d} / {written} written results")
    for name in sorted(k for k in counts if k.startswith("fact ")):
        print(f"  {name:40s} {counts[name]:4d} / {counts['n_' + name]}")
    shown = 0
    for record in records:
        decision = parse_decision_line(record[args.key])
        if shown < args.show and (decision is None or decision["outcome"] != record["reference_decision"]["outcome"]):
            shown += 1
            print(f"\n--- {record['id']} (reference {record['reference_decision']})\n{record[args.key]}")


if __name__ == "__main__":
    main()
