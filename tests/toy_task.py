"""A toy task for the tests: arithmetic questions, each reply scored on the exact answer (docs/task.md).

python train.py --task tests/toy_task.py ...; python evaluate.py --task tests/toy_task.py ...
"""


def score_reply(reply: str, record: dict) -> dict[str, float] | None:
    """{"exact": 1.0} when the reply is the reference answer (the final assistant turn), else 0.0."""
    return {"exact": float(reply.strip() == record["messages"][-1]["content"])}
