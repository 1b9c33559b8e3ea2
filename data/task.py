"""The underwriting task: how a generated reply is scored against its record (train.py --task).

Helper B expands this into the full task interface (docs/task.md).
"""

from __future__ import annotations

from common.decision import parse_decision_line


def score_reply(reply: str, record: dict) -> dict[str, float] | None:
    """Whether the reply's DECISION line parses and names the reference outcome (None: no reference)."""
    reference = record.get("decision")
    if not reference:
        return None
    parsed = parse_decision_line(reply)
    return {
        "parse_rate": float(parsed is not None),
        "outcome_accuracy": float(bool(parsed) and parsed["outcome"] == reference["outcome"]),
    }
