"""--task: train.py and evaluate.py score another task (tests/toy_task.py: arithmetic, exact answers).

The scores are recomputed here from the replies the scripts wrote, independently of both scripts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import evaluate
import train
from tests.conftest import REPO, write_jsonl

TOY_TASK = str(REPO / "tests" / "toy_task.py")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def arithmetic(i: int) -> dict:
    """A record of the toy task: a sum to answer, with nothing else (no id, no decision)."""
    a, b = 3 + i % 7, 4 + i % 5
    question = {"role": "user", "content": f"What is {a} + {b}?"}
    return {"messages": [question, {"role": "assistant", "content": str(a + b)}]}


@pytest.fixture(scope="module")
def toy_task_run(tmp_path_factory, tiny_model_dir) -> Path:
    """train.py on 12 sums for one epoch (6 updates), its 3 sample replies scored by the toy task."""
    data = tmp_path_factory.mktemp("sums")
    write_jsonl(data / "train.jsonl", [arithmetic(i) for i in range(12)])
    write_jsonl(data / "validation.jsonl", [arithmetic(100 + i) for i in range(4)])
    write_jsonl(data / "test.jsonl", [arithmetic(200 + i) for i in range(6)])
    run = data / "runs" / "sums"
    train.main(
        ["--model", str(tiny_model_dir), "--train-file", str(data / "train.jsonl"), "--validation-file",
         str(data / "validation.jsonl"), "--output-dir", str(run), "--batch-size", "2", "--grad-accum", "1", "--epochs", "1",
         "--rank", "4", "--mixed-precision", "no", "--report-to", "none", "--num-samples", "3",
         "--max-new-tokens", "4", "--task", TOY_TASK]
    )  # fmt: skip
    return run


def test_train_logs_the_toy_scores(toy_task_run):
    evals = read_jsonl(toy_task_run / "eval_log.jsonl")
    assert [e["step"] for e in evals] == [0, 6]
    for record in evals:
        samples = read_jsonl(toy_task_run / "samples" / f"step_{record['step']:06d}.jsonl")
        exact = [s["generated"].strip() == s["reference"] for s in samples]
        assert record["sample_n"] == len(samples) == 3 and record["sample_exact"] == sum(exact) / 3
        assert not [key for key in record if "parse_rate" in key or "outcome" in key]  # no underwriting scores
    assert f"samples: exact {evals[-1]['sample_exact']:.0%}" in (toy_task_run / "train.log").read_text()


def test_evaluate_reports_the_toy_scores(toy_task_run, tmp_path):
    """The trained adapter against its base: the mean exact score of each model and its interval."""
    argv = ["--adapter", str(toy_task_run / "best"), "--data-file", str(toy_task_run.parents[1] / "test.jsonl")]
    metrics = evaluate.main([*argv, "--task", TOY_TASK, "--max-new-tokens", "4", "--bootstrap", "50"])
    output = toy_task_run / "eval"
    lines = read_jsonl(output / "predictions.jsonl")
    assert len(lines) == 6 and metrics["extra_prompts"] == 0 and not (output / "extra_predictions.jsonl").read_text()
    for name in ("base", "finetuned"):
        exact = [float(line[f"generated_{name}"].strip() == line["reference"]) for line in lines]
        assert [line[f"score_{name}"] for line in lines] == [{"exact": e} for e in exact]
        scores = metrics["models"][name]["scores"]
        assert scores["n"] == 6 and scores["exact"]["mean"] == sum(exact) / 6
        assert scores["exact"]["low"] <= scores["exact"]["mean"] <= scores["exact"]["high"]
        assert "decision" not in metrics["models"][name] and "asks" not in metrics["models"][name]
    written = json.loads((output / "metrics.json").read_text())
    assert written["models"]["finetuned"]["scores"] == metrics["models"]["finetuned"]["scores"]
    assert "| exact (task score) | " in (output / "report.md").read_text()


def answer_odd_first_terms(model, tokenizer, prompts, batch_size, max_new_tokens, progress=None, **kwargs):
    """Stands in for the generator: the right sum when the first term is odd, one more when it is even."""
    replies = []
    for messages in prompts:
        a, b = map(int, re.findall(r"\d+", messages[-1]["content"]))
        replies.append(f" {a + b}\n" if a % 2 else str(a + b + 1))
    return replies


def test_known_right_and_wrong_answers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "generate_replies", answer_odd_first_terms)
    records = [arithmetic(i) for i in range(5)]  # first terms 3, 4, 5, 6, 7
    write_jsonl(tmp_path / "sums.jsonl", records)
    argv = ["--model", str(tiny_model_dir), "--data-file", str(tmp_path / "sums.jsonl"), "--task", TOY_TASK]
    metrics = evaluate.main([*argv, "--bootstrap", "50", "--output-dir", str(tmp_path / "eval")])
    lines = read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert [line["generated_base"] for line in lines] == [" 7\n", "10", " 11\n", "14", " 15\n"]
    assert [line["score_base"] for line in lines] == [{"exact": e} for e in (1.0, 0.0, 1.0, 0.0, 1.0)]
    assert metrics["models"]["base"]["scores"]["exact"]["mean"] == pytest.approx(3 / 5)
    assert "| exact (task score) | 0.600 [" in (tmp_path / "eval" / "report.md").read_text()


def test_a_task_file_without_score_reply_is_refused(tmp_path):
    (tmp_path / "empty_task.py").write_text('"""No score_reply here."""\n')
    with pytest.raises(SystemExit, match="defines no score_reply"):
        evaluate.main(["--task", str(tmp_path / "empty_task.py"), "--output-dir", str(tmp_path)])
