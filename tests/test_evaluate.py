"""evaluate.py on the tiny model: base vs finetuned in one run, files written, wrong base refused."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import evaluate


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter on the tiny model whose lora_B is perturbed, so it changes the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("runs") / "demo" / "best"  # laid out like a run's best/ folder
    model.save_pretrained(path)
    (path / "COMPLETE").write_text("done\n")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    return path


@pytest.fixture(scope="module")
def evaluated(adapter_dir, tiny_model_dir, toy_data_dir):
    """Run evaluate.main once for the module (default output folder); returns (metrics, output folder)."""
    argv = ["--adapter", str(adapter_dir), "--model", str(tiny_model_dir), "--data-file"]
    argv += [str(toy_data_dir / "test.jsonl"), "--limit", "4", "--max-new-tokens", "8", "--batch-size", "3"]
    argv += ["--bootstrap", "200", "--dtype", "fp32"]
    return evaluate.main(argv), adapter_dir.parent / "eval"  # runs/<run>/best -> runs/<run>/eval


def test_metrics_cover_both_models(evaluated):
    metrics, output_dir = evaluated
    written = json.loads((output_dir / "metrics.json").read_text())
    assert written["models"].keys() == {"base", "finetuned"}
    assert written["loss_examples"] == written["generation_examples"] == 4
    base, tuned = written["models"]["base"], written["models"]["finetuned"]
    for result in (base, tuned):
        assert result["loss"]["low"] <= result["loss"]["mean"] <= result["loss"]["high"]
        assert math.isclose(result["perplexity"]["value"], math.exp(result["loss"]["mean"]), rel_tol=1e-9)
        assert set(result["rouge"]) == {"rouge1", "rouge2", "rougeL"}
        assert set(result["decision"]["overall"]) >= {
            "parse_rate",
            "outcome_accuracy",
            "risk_class_accuracy",
            "rule_f1",
        }
        assert list(result["decision"]["by_line_of_business"]) == ["term_life"]
        assert result["trained_tokens"] == base["trained_tokens"] > 0  # same examples for both
    # the perturbed adapter changes the model, so the two perplexities differ
    assert abs(base["perplexity"]["value"] - tuned["perplexity"]["value"]) > 1e-3
    delta = written["comparison"]["loss_delta"]
    assert math.isclose(delta["mean"], tuned["loss"]["mean"] - base["loss"]["mean"], rel_tol=1e-6, abs_tol=1e-9)
    assert written["settings"]["dtype"] == "float32"
    assert metrics["comparison"]["significant"] == (delta["high"] < 0 or delta["low"] > 0)


def test_predictions_and_report(evaluated):
    metrics, output_dir = evaluated
    lines = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == ["toy-200", "toy-201", "toy-202", "toy-203"]
    for line in lines:
        assert line["reference"].splitlines()[-1].startswith("DECISION:")
        assert line["reference_decision"]["outcome"] in ("approve", "refer", "decline")
        assert isinstance(line["generated_base"], str) and isinstance(line["generated_finetuned"], str)
        assert line["loss_base"] > 0 and line["loss_finetuned"] > 0
    for name in ("base", "finetuned"):  # the parse rate in metrics.json matches the predictions file
        parsed = sum(line[f"decision_{name}"] is not None for line in lines) / len(lines)
        assert metrics["models"][name]["decision"]["overall"]["parse_rate"] == parsed
    report = (output_dir / "report.md").read_text()
    assert "| metric | base | finetuned | finetuned - base |" in report
    assert "| perplexity |" in report and "| outcome accuracy |" in report and "How sure" in report
    assert "| term_life | 4 |" in report
    assert "| outcome accuracy | " in report and "] | " in report  # values come with their intervals


def test_asking_turns_are_generated_and_scored(evaluated):
    metrics, output_dir = evaluated
    assert metrics["extra_prompts"] == 4  # one asking turn in each of the 4 conversations
    lines = [json.loads(line) for line in (output_dir / "extra_predictions.jsonl").read_text().splitlines()]
    assert [(line["id"], line["turn"], line["expected"]) for line in lines] == [
        (f"toy-20{i}", 1, ["bmi"]) for i in range(4)
    ]
    for name in ("base", "finetuned"):
        asks = metrics["models"][name]["asks"]
        assert asks["n_turns"] == 4
        # recomputed from the file: recall over the one missing fact of each turn
        recall = sum("the bmi" in line[f"generated_{name}"].lower() for line in lines) / 4
        assert asks["ask_recall"] == recall
        assert 0.0 <= asks["early_decision_rate"] <= 1.0
        assert "asks_again" not in metrics["models"][name]  # the records carry no facts: not scored
        ci = metrics["models"][name]["decision_ci"]
        # the generated records carry the rulebook's conditions, and some are approvals
        assert set(ci) == {"parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1", "condition_accuracy"}
        assert all(c["low"] <= c["mean"] <= c["high"] for c in ci.values())
    report = (output_dir / "report.md").read_text()
    assert "| ask recall (missing facts asked for) |" in report
    assert "| decides too early (DECISION at an asking turn) |" in report
    assert "| approval conditions right (reference approvals) |" in report


def test_model_mismatch_exits_with_message(adapter_dir, toy_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            [
                "--adapter",
                str(adapter_dir),
                "--model",
                "some-org/other-model",
                "--data-file",
                str(toy_data_dir / "test.jsonl"),
                "--output-dir",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code not in (0, None)
    assert "was trained on" in str(exit_info.value.code) and "some-org/other-model" in str(exit_info.value.code)
    assert not (tmp_path / "metrics.json").exists()


def test_incomplete_checkpoint_is_refused(adapter_dir, toy_data_dir, tmp_path):
    broken = tmp_path / "run" / "best"
    shutil.copytree(adapter_dir, broken)
    (broken / "COMPLETE").unlink()
    (broken / "trainer_state.json").write_text("{}")  # a run folder's adapter, but never marked complete
    with pytest.raises(SystemExit, match="COMPLETE"):
        evaluate.main(["--adapter", str(broken), "--data-file", str(toy_data_dir / "test.jsonl")])


def test_base_only_mode(tiny_model_dir, toy_data_dir, tmp_path):
    metrics = evaluate.main(
        [
            "--model",
            str(tiny_model_dir),
            "--data-file",
            str(toy_data_dir / "test.jsonl"),
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--bootstrap",
            "50",
            "--output-dir",
            str(tmp_path),
        ]
    )
    assert list(metrics["models"]) == ["base"] and "comparison" not in metrics
    assert (tmp_path / "predictions.jsonl").read_text().count("\n") == 2
    assert "| metric | base |" in (tmp_path / "report.md").read_text()


def test_replies_that_loop_end_early_and_are_counted(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    # The tied tiny model writes one token forever: with --loop-repeats 3 each reply ends at 24 tokens (that
    # token 3 x 8 times), with 0 at --max-new-tokens; each setting is its own base-cache key.
    monkeypatch.setenv("UNDERWRITE_EVAL_CACHE", str(tmp_path / "cache"))
    argv = ["--model", str(tiny_model_dir), "--data-file", str(toy_data_dir / "test.jsonl"), "--limit", "2"]
    argv += ["--max-new-tokens", "30", "--bootstrap", "10", "--no-extra-prompts"]
    looped = evaluate.main([*argv, "--output-dir", str(tmp_path / "a")])
    plain = evaluate.main([*argv, "--loop-repeats", "0", "--output-dir", str(tmp_path / "b")])
    assert looped["settings"]["loop_repeats"] == 3 and plain["settings"]["loop_repeats"] == 0
    generation = looped["models"]["base"]["generation"]
    assert (generation["looped"], generation["new_tokens"], generation["replies"]) == (2, 48, 2)
    generation = plain["models"]["base"]["generation"]
    assert (generation["looped"], generation["new_tokens"]) == (0, 60)
    assert looped["models"]["base"]["cache"]["key"] != plain["models"]["base"]["cache"]["key"]
    monkeypatch.setattr(evaluate, "LOOP_SPAN", 9)  # another span: another key, the report says it
    other = evaluate.main([*argv, "--output-dir", str(tmp_path / "c")])
    assert other["settings"]["loop_span"] == 9 and looped["settings"]["loop_span"] == 8
    assert other["models"]["base"]["cache"]["key"] != looped["models"]["base"]["cache"]["key"]
    assert "one span of 9+ tokens" in (tmp_path / "c/report.md").read_text()
    note = "a reply ended once it wrote one span of 8+ tokens 3 times in a row (base 2 replies)"
    assert note in (tmp_path / "a/report.md").read_text() and "in a row" not in (tmp_path / "b/report.md").read_text()


def test_no_base_scores_only_the_adapter(adapter_dir, tiny_model_dir, toy_data_dir, tmp_path):
    argv = [
        "--adapter",
        str(adapter_dir),
        "--model",
        str(tiny_model_dir),
        "--data-file",
        str(toy_data_dir / "test.jsonl"),
    ]
    argv += ["--limit", "2", "--max-new-tokens", "4", "--bootstrap", "50", "--no-base", "--output-dir", str(tmp_path)]
    metrics = evaluate.main(argv)
    assert list(metrics["models"]) == ["finetuned"] and "comparison" not in metrics
    assert metrics["models"]["finetuned"]["asks"]["n_turns"] == 2
    assert "| metric | finetuned |" in (tmp_path / "report.md").read_text()


def test_base_results_are_cached_and_reused_until_an_input_changes(
    adapter_dir, tiny_model_dir, toy_data_dir, tmp_path, monkeypatch, caplog
):
    """The base model's outputs are computed once per (model files, data, settings, precision, packages)."""
    import logging

    monkeypatch.setenv("UNDERWRITE_EVAL_CACHE", str(tmp_path / "cache"))
    argv = ["--adapter", str(adapter_dir), "--model", str(tiny_model_dir), "--data-file"]
    argv += [str(toy_data_dir / "test.jsonl"), "--limit", "3", "--max-new-tokens", "6", "--bootstrap", "50"]
    first = evaluate.main([*argv, "--output-dir", str(tmp_path / "first")])
    stored = first["models"]["base"]["cache"]
    assert stored["used"] is False and Path(stored["file"]).parent == tmp_path / "cache"
    assert json.loads(Path(stored["file"]).read_text())["outputs"]["replies"] == [
        json.loads(line)["generated_base"] for line in (tmp_path / "first/predictions.jsonl").read_text().splitlines()
    ]

    real_run_model = evaluate.run_model

    def finetuned_only(name, *args, **kwargs):
        assert name != "base", "the base model ran although its results were cached"
        return real_run_model(name, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_model", finetuned_only)
    with caplog.at_level(logging.INFO, logger="evaluate"):
        second = evaluate.main([*argv, "--output-dir", str(tmp_path / "second")])
    assert second["models"]["base"]["cache"] == {"used": True, "file": stored["file"], "key": stored["key"]}
    assert "base: reusing the cached evaluation" in caplog.text
    for key in ("loss", "rouge", "decision", "asks"):  # the same numbers, recomputed from the cached outputs
        assert second["models"]["base"][key] == first["models"]["base"][key]
    first_lines, second_lines = ((tmp_path / d / "predictions.jsonl").read_text() for d in ("first", "second"))
    assert first_lines == second_lines
    written = json.loads((tmp_path / "second/metrics.json").read_text())
    assert written["models"]["base"]["cache"]["used"] is True

    monkeypatch.setattr(evaluate, "run_model", real_run_model)
    again = evaluate.main([*argv, "--output-dir", str(tmp_path / "third"), "--no-cache"])  # recomputed on request
    assert (
        again["models"]["base"]["cache"]["used"] is False and again["models"]["base"]["cache"]["key"] == stored["key"]
    )
    changed = [*argv[:-4], "--max-new-tokens", "5", "--bootstrap", "50", "--output-dir", str(tmp_path / "fourth")]
    other = evaluate.main(changed)  # another generation setting: another key, computed afresh
    assert (
        other["models"]["base"]["cache"]["used"] is False and other["models"]["base"]["cache"]["key"] != stored["key"]
    )
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2


# Known replies for the first four test conversations (toy-200..203: decline n/a L-3, approve standard
# L-1, refer n/a L-2, decline n/a L-3), keyed by the applicant's age in the prompt (30 + i % 20).
FINETUNED_FINAL = {
    "30": "Rule L-3 applies.\nDECISION: decline | CLASS: n/a | RULES: L-3",  # all right (= the reference)
    "31": "Approve.\nDECISION: approve | CLASS: preferred | RULES: L-1, L-2",  # outcome right, class wrong, 1 extra rule
    "32": "I still need the BMI.",  # no decision line: unparsed, asks at the decision turn, misses L-2
    "33": "decision : REFER|class: N/A|rules: l - 3.",  # lenient parse: outcome wrong, class and rule right
}
BASE_FINAL = "Approve. Condition: a medical exam.\nDECISION: approve | CLASS: standard | RULES: L-1"
FINETUNED_ASK = {
    "30": "What is the BMI?",  # exactly the missing fact
    "31": "I need the BMI and smoking status.",  # right, plus one fact already given
    "32": "DECISION: approve | CLASS: standard | RULES: L-1",  # decides too early
    "33": "Thanks.",  # asks nothing
}


DECISION_KEYS = ("parse_rate", "outcome_accuracy", "risk_class_accuracy", "rule_f1")
ASK_KEYS = ("ask_precision", "ask_recall", "exact_rate", "early_decision_rate")


def pick(metrics: dict, keys: tuple[str, ...]) -> dict:
    return {key: metrics[key] for key in keys}


def fake_generate_replies(model, tokenizer, prompts, batch_size, max_new_tokens, progress=None, **kwargs):
    """Stands in for common.generation.generate_replies: fixed replies per conversation and model."""
    base = any(getattr(module, "disable_adapters", False) for module in model.modules() if hasattr(module, "lora_A"))
    replies = []
    for messages in prompts:
        age = re.search(r"Applicant is (\d+)", str(messages)).group(1)
        final = "BMI is" in str(messages[-1])  # the final turn follows the user's answer
        if base:
            replies.append(BASE_FINAL)
        else:
            replies.append((FINETUNED_FINAL if final else FINETUNED_ASK)[age])
    return replies


def test_metrics_of_known_replies(adapter_dir, tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    """Stubbed generator, replies scored by hand: decision metrics, asking turns, their files and report rows"""
    monkeypatch.setattr(evaluate, "generate_replies", fake_generate_replies)
    monkeypatch.setenv("UNDERWRITE_EVAL_CACHE", str(tmp_path / "cache"))  # the stub's base replies stay here
    records = [json.loads(line) for line in (toy_data_dir / "test.jsonl").read_text().splitlines()[:4]]
    for record in records:  # the facts the conversation gives: age, smoker, face amount; then the BMI
        record["facts"] = {"age": 30, "smoker": False, "face_amount": 250000, "bmi": 24}
    data_file = tmp_path / "test.jsonl"
    data_file.write_text("".join(json.dumps(record) + "\n" for record in records))
    argv = ["--adapter", str(adapter_dir), "--model", str(tiny_model_dir), "--data-file"]
    argv += [str(data_file), "--bootstrap", "200", "--output-dir", str(tmp_path)]
    metrics = evaluate.main(argv)
    tuned, base = metrics["models"]["finetuned"], metrics["models"]["base"]
    # finetuned: parsed 3 of 4; outcome right for 200, 201; class right for 200, 203;
    # rules: 3 right, 1 extra (L-2 at 201), 1 missed (L-2 at 202) -> F1 = 2*3 / (2*3 + 1 + 1)
    assert pick(tuned["decision"]["overall"], DECISION_KEYS) == pytest.approx(
        {"parse_rate": 0.75, "outcome_accuracy": 0.5, "risk_class_accuracy": 0.5, "rule_f1": 0.75}
    )
    assert tuned["asks_at_decision_rate"] == 0.25
    assert tuned["decision_ci"]["condition_accuracy"]["mean"] == 1.0  # the one approval names no condition, right
    # base: approves everything citing L-1: outcome and class right only for 201; rules 1 right, 3 extra,
    # 3 missed -> F1 = 2 / (2 + 3 + 3); the approval names a condition the reference has not
    assert pick(base["decision"]["overall"], DECISION_KEYS) == pytest.approx(
        {"parse_rate": 1.0, "outcome_accuracy": 0.25, "risk_class_accuracy": 0.25, "rule_f1": 0.25}
    )
    assert base["asks_at_decision_rate"] == 0.0 and base["decision_ci"]["condition_accuracy"]["mean"] == 0.0
    outcomes = tuned["decision"]["outcome_confusion"]
    assert outcomes["matrix"][outcomes["labels"].index("decline")] == [0, 1, 1, 0]  # one right, one called refer
    # asking turns (each should ask for the BMI only): asked bmi, bmi + smoker, nothing (decided), nothing
    assert pick(tuned["asks"], ASK_KEYS) == pytest.approx(
        {"ask_precision": 2 / 3, "ask_recall": 0.5, "exact_rate": 0.25, "early_decision_rate": 0.25}
    )
    assert tuned["asks"]["n_turns"] == 4 and base["asks"]["early_decision_rate"] == 1.0
    assert base["asks"]["ask_recall"] == 0.0
    # asking again for a given fact: the finetuned final "I still need the BMI." and the asking turn that
    # wants smoking status too, 2 of 8 turns; the base asks for nothing
    again = tuned["asks_again"]
    assert (again["rate"], again["final_rate"], again["asking_rate"]) == (0.25, 0.25, 0.25)
    assert again["n_conversations"] == again["n_asking_turns"] == 4 and base["asks_again"]["rate"] == 0.0
    # every task number, intervals and confusions included, exactly as evaluate.py computed it before
    # data/task.py took the decision metrics over (tests/task_metrics_before.json)
    before = json.loads((Path(__file__).parent / "task_metrics_before.json").read_text())["evaluate_known_replies"]
    for name in ("base", "finetuned"):
        assert {key: metrics["models"][name][key] for key in before[name]} == before[name]
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [line["generated_finetuned"] for line in lines] == list(FINETUNED_FINAL.values())
    assert lines[3]["decision_finetuned"]["outcome"] == "refer" and lines[2]["decision_finetuned"] is None
    assert all(line["generated_base"] == BASE_FINAL for line in lines)
    report = (tmp_path / "report.md").read_text()
    assert re.search(r"\| outcome accuracy \| 0\.250 [^|]*\| 0\.500 ", report), report
    assert re.search(r"\| ask recall \(missing facts asked for\) \| 0\.000 [^|]*\| 0\.500 ", report), report
    row = r"\| asks again for a given fact \(final and asking turns\) \| 0\.000 [^|]*\| 0\.250 [^|]*\| \+0\.250 \|"
    assert re.search(row, report), report


@pytest.mark.parametrize(("flags", "message"), [(["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
                                                (["--limit", "0"], "--limit must be at least 1, got 0"),
                                                (["--loop-repeats", "1"], "--loop-repeats must be 0 (never) or at least 2, got 1")])  # fmt: skip
def test_bad_flags_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as excinfo:
        evaluate.parse_args(flags)
    assert excinfo.value.code == 2 and message in capsys.readouterr().err


def test_own_history_prompts_carry_the_models_earlier_replies():
    # Two chats (3 and 1 assistant turns) and three extra prompts: two that end before an assistant
    # turn of chat "a" and one that is no chat's prefix. The fake model answers with the prompt it saw.
    def turn(role, content):
        return {"role": role, "content": content}

    a = [turn("user", "u1"), turn("assistant", "A1"), turn("user", "u2"), turn("assistant", "A2")]
    a += [turn("user", "u3"), turn("assistant", "A3")]
    chats = [{"messages": a}, {"messages": [turn("user", "v1"), turn("assistant", "B1")]}]
    extras = [{"messages": a[:1]}, {"messages": a[:3]}, {"messages": [turn("user", "other")]}]
    calls = []

    def generate(prompts, follow_up):
        """Replies in order; a follow-up prompt joins the end of the queue (as in a running batch)."""
        queue, replies = list(prompts), []
        while len(replies) < len(queue):
            replies.append("|".join(m["content"] for m in queue[len(replies)]))
            following = None if follow_up is None else follow_up(len(replies) - 1, replies[-1])
            queue += [] if following is None else [following]
        calls.append(queue)
        return replies

    finals, extra_replies = evaluate.own_history_replies(generate, chats, extras)
    # One call for turn 1 of both chats, followed by turns 2 and 3 of chat "a"; one for the unmatched extra.
    assert [len(prompts) for prompts in calls] == [4, 1]
    assert calls[0][2] == [turn("user", "u1"), turn("assistant", "u1"), turn("user", "u2")]
    # Written out by hand: each earlier assistant turn is the reply the fake gave at that turn.
    assert finals == ["u1|u1|u2|u1|u1|u2|u3", "v1"]
    assert extra_replies == ["u1", "u1|u1|u2", "other"]
