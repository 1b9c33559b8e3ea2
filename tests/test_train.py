"""train.py on a tiny random Llama: files, logs, resume equivalence, early stopping, NaN guard, QLoRA."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from common import precision
from common.precision import cpu_bf16_supported
from data.task import parse_decision_line
from tests.conftest import REPO, make_conversation, write_jsonl
from tests.faults import inject_faults


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    """Loss per optimizer step; a resumed run logs replayed steps again, the last occurrence wins."""
    return {r["step"]: r["loss"] for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"}


def base_args(model_dir: Path, data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model_dir), "--train-file", str(data_dir / "train.jsonl"),
        "--validation-file", str(data_dir / "validation.jsonl"), "--output-dir", str(output_dir),
        "--batch-size", "2", "--grad-accum", "3", "--epochs", "2", "--rank", "4", "--alpha", "8",
        "--mixed-precision", "no", "--report-to", "none", "--num-samples", "2", "--max-new-tokens", "4",
        "--grad-log-every", "2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir, toy_data_dir) -> Path:
    """One uninterrupted run: 24 examples, batch 2 x accum 3 -> 4 steps/epoch, 2 epochs, checkpoint every 3."""
    output = tmp_path_factory.mktemp("runs") / "reference"
    train.main(base_args(tiny_model_dir, toy_data_dir, output, "--save-every", "3", "--report-to", "tensorboard"))
    return output


def test_run_folder_files_logs_and_config(reference_run, toy_data_dir):
    run = reference_run
    for name in ("config.json", "train.log", "train_log.jsonl", "eval_log.jsonl", "grad_log.jsonl", "summary.json",
                 "update_ratios.json", "best/adapter_model.safetensors", "best/metrics.json", "best/COMPLETE",
                 "final/adapter_model.safetensors", "final/adapter_config.json", "final/chat_template.jinja",
                 "checkpoints/step_000008/COMPLETE", "samples/step_000000.jsonl"):  # fmt: skip
        assert (run / name).exists(), name
    assert list((run / "tensorboard").rglob("events.out.tfevents*"))
    assert not (run / ".lock").exists()
    config = json.loads((run / "config.json").read_text())
    derived = config["derived"]
    assert derived["grad_accum"] == 3 and derived["steps_per_epoch"] == 4 and derived["total_steps"] == 8
    assert derived["warmup_steps"] == 1 and derived["mixed_precision"] == "no"
    assert derived["attn_implementation"] == "eager"  # CPU, every example <= 512 tokens
    # the memory pre-flight sizes the longest padded row, not --max-seq-len (1024): eager attention's
    # len^2 probabilities made a 1024-token estimate 4x too big for the default data
    estimate_line = derived["memory_preflight"]
    from common.data import load_records, tokenize_records
    from common.model import load_tokenizer

    examples, _ = tokenize_records(
        load_records(toy_data_dir / "train.jsonl"), load_tokenizer(config["args"]["model"]), 1024
    )
    longest = max(len(e["input_ids"]) for e in examples)
    assert f"x {-(-longest // 64) * 64} tokens" in estimate_line, (longest, estimate_line)
    # rank 4 on q/k/v of 2 layers: 4*(64+64) + 2*4*(64+32) per layer
    assert derived["trainable_params"] == 2 * (4 * 128 + 2 * 4 * 96)
    assert derived["trainable_pct"] < 1.0
    assert config["lora"]["r"] == 4 and sorted(config["lora"]["target_modules"]) == ["k_proj", "q_proj", "v_proj"]
    assert (
        config["dataset"]["train_sha256"]
        == __import__("hashlib").sha256((toy_data_dir / "train.jsonl").read_bytes()).hexdigest()
    )
    assert {"torch", "transformers", "peft", "accelerate"} <= set(config["versions"])
    assert config["git_commit"] and config["seed"] == 1234

    steps = [r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for record in steps:
        assert record["tokens"] > record["trained_tokens"] > 0 and record["tokens_per_s"] > 0 and record["mfu"] > 0
        assert record["peak_mem_mb"] > 0 and record["grad_norm"] > 0 and not record["skipped"]
    assert steps[0]["lr"] == pytest.approx(2e-4)  # one warmup step, then cosine decay to 0
    assert steps[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    epochs = [r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["epoch_time_s"] > 0 for e in epochs)
    grads = read_jsonl(run / "grad_log.jsonl")
    assert [g["step"] for g in grads] == [2, 4, 6, 8]
    assert set(grads[0]["norms"]) == {f"{layer}.{p}.{ab}" for layer in (0, 1) for p in ("q_proj", "k_proj", "v_proj") for ab in "AB"}  # fmt: skip

    evals = read_jsonl(run / "eval_log.jsonl")
    assert [e["step"] for e in evals] == [0, 4, 8] and evals[0]["baseline"] and not evals[1]["baseline"]
    assert all(e["val_tokens"] > 0 and e["val_loss_ci95"] > 0 for e in evals)
    log = (run / "train.log").read_text()
    assert "trainable params 2,560 / " in log and "| 4 steps/epoch, 8 total, 1 warmup" in log
    assert "step 8 | loss " in log and " tok/s | mfu " in log and "eval step 0 | val loss" in log
    samples = read_jsonl(run / "samples" / "step_000008.jsonl")
    assert len(samples) == 2 and {"reference", "generated", "prompt_messages"} <= set(samples[0])
    # the samples are scored at every validation; the tiny random model writes no decision line
    parsed = [parse_decision_line(s["generated"]) is not None for s in samples]
    assert evals[-1]["sample_n"] == 2 and evals[-1]["sample_parse_rate"] == sum(parsed) / 2
    assert f"samples: parse_rate {evals[-1]['sample_parse_rate']:.0%}" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 8 and summary["epochs_completed"] == 2
    assert summary["baseline_val_ppl"] == pytest.approx(evals[0]["val_ppl"])
    best = json.loads((run / "best" / "metrics.json").read_text())
    assert best["val_ppl"] == pytest.approx(min(e["val_ppl"] for e in evals[1:]))
    adapter_config = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == config["args"]["model"]


def test_resume_mid_epoch_and_mid_window_equals_uninterrupted(
    reference_run, tiny_model_dir, toy_data_dir, tmp_path, monkeypatch
):
    """Crash after micro-step 11 (inside the 4th accumulation window); the resume starts from the
    step-3 checkpoint (mid-epoch: batch 9 of 12) and must reproduce every loss and the final adapter."""
    run = tmp_path / "interrupted"
    args = base_args(tiny_model_dir, toy_data_dir, run, "--save-every", "3")
    inject_faults(monkeypatch, stop=11)
    with pytest.raises(SystemExit, match="injected crash after micro-step 11"):
        train.main(args)
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000003"]
    state = json.loads((run / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert state["batches_done_in_epoch"] == 9 and state["epoch"] == 0
    # --mixed-precision auto on a resume keeps the run's fp32; measured again, this probe would pick bf16
    monkeypatch.setattr(precision, "_best_rates", lambda device, names, *rest: {"fp32": 1e9, "bf16": 1e12})
    train.main([*args, "--resume-from", "latest", "--mixed-precision", "auto"])
    expected, resumed = step_losses(reference_run), step_losses(run)
    assert sorted(resumed) == sorted(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-5), step
    final_ref = load_file(reference_run / "final" / "adapter_model.safetensors")
    final_new = load_file(run / "final" / "adapter_model.safetensors")
    for name, tensor in final_ref.items():
        torch.testing.assert_close(final_new[name], tensor, atol=1e-6, rtol=1e-5)
    assert "resumed from" in (run / "train.log").read_text()
    assert f"kept from {run / 'config.json'} on resume" in (run / "train.log").read_text()


def test_config_round_trip_reproduces_the_losses(reference_run, tmp_path):
    again = tmp_path / "again"
    train.main(["--config", str(reference_run / "config.json"), "--output-dir", str(again)])
    assert step_losses(again) == pytest.approx(step_losses(reference_run), abs=1e-6)
    first, second = (json.loads((r / "config.json").read_text())["args"] for r in (reference_run, again))
    assert {k: v for k, v in first.items() if k not in ("output_dir", "config", "run_name")} == {
        k: v for k, v in second.items() if k not in ("output_dir", "config", "run_name")
    }


def test_loss_decreases_on_a_memorizable_toy_set(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Same architecture, larger init: with std 0.02 embeddings the tied LM head cannot express a sharp
    # distribution, so even a perfect adapter could barely lower the loss below ln(vocab).
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "model")
    tiny_model_dir = tmp_path / "model"
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [make_conversation(i % 4) for i in range(16)])
    write_jsonl(data / "validation.jsonl", [make_conversation(i) for i in range(4)])
    run = tmp_path / "memorize"
    summary = train.main(base_args(tiny_model_dir, data, run, "--epochs", "6", "--lr", "3e-2", "--grad-accum", "1",
                                   "--target-modules", "all-linear", "--rank", "8", "--warmup-ratio", "0",
                                   "--early-stopping-patience", "0", "--num-samples", "0"))  # fmt: skip
    losses = list(step_losses(run).values())
    evals = read_jsonl(run / "eval_log.jsonl")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 2.0  # nats
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 2.0
    assert summary["best_val_ppl"] < summary["baseline_val_ppl"] / 5


def test_gradient_accumulation_of_4x1_equals_one_batch_of_4(tiny_model_dir, tmp_path):
    """Variable-length examples: the loss is the mean over all trained tokens of the effective batch."""
    data = tmp_path / "data"
    data.mkdir()
    records = [make_conversation(i) for i in range(4)]
    records[1]["messages"][-1]["content"] += " Additional rationale text makes this reply longer." * 3
    write_jsonl(data / "train.jsonl", records)
    write_jsonl(data / "validation.jsonl", records[:2])
    results = {}
    for name, batch, accum in (("one_batch", "4", "1"), ("accumulated", "1", "4")):
        run = tmp_path / name
        train.main(base_args(tiny_model_dir, data, run, "--batch-size", batch, "--grad-accum", accum, "--dropout", "0",
                             "--epochs", "1", "--no-baseline", "--num-samples", "0"))  # fmt: skip
        results[name] = [r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "step"]
    one, accumulated = results["one_batch"], results["accumulated"]
    assert len(one) == len(accumulated) == 1
    assert accumulated[0]["trained_tokens"] == one[0]["trained_tokens"]
    assert accumulated[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert accumulated[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)
    # a mean of per-micro-batch means would differ measurably on these unequal lengths
    per_example = [r for r in read_jsonl(tmp_path / "accumulated" / "train_log.jsonl") if r["type"] == "step"]
    assert per_example[0]["trained_tokens"] > 4 * 10


def test_early_stopping_triggers_after_patience(tiny_model_dir, toy_data_dir, tmp_path):
    run = tmp_path / "early"
    summary = train.main(base_args(tiny_model_dir, toy_data_dir, run, "--epochs", "6", "--num-samples", "0",
                                   "--early-stopping-patience", "2", "--early-stopping-min-delta", "100"))  # fmt: skip
    # epoch 1 sets the best; epochs 2 and 3 do not improve by 100 nats -> stop after epoch 3 of 6
    assert summary["status"] == "early_stopped" and summary["epochs_completed"] == 3
    assert summary["best_epoch"] == 1 and summary["global_step"] == 12
    assert (
        "early stopping: validation loss did not improve by more than 100.0 for 2 evaluations"
        in (run / "train.log").read_text()
    )


def test_nan_guard_skips_counts_and_stops(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    """Isolated bad steps under --max-bad-steps 1 complete (the counter resets after a good step); two in a row stop"""
    run = tmp_path / "one_nan"
    inject_faults(monkeypatch, loss={2}, grad={5})
    summary = train.main(base_args(tiny_model_dir, toy_data_dir, run, "--num-samples", "0", "--max-bad-steps", "1"))
    bad = [r for r in read_jsonl(run / "train_log.jsonl") if r["type"] == "bad_step"]
    assert [r["step"] for r in bad] == [2, 5] and summary["bad_steps_total"] == 2
    assert summary["status"] == "completed"
    for folder in ("best", "final"):
        for name, tensor in load_file(run / folder / "adapter_model.safetensors").items():
            assert torch.isfinite(tensor).all(), (folder, name)
    assert "non-finite loss nan" in (run / "train.log").read_text()

    run = tmp_path / "many_nan"
    monkeypatch.undo()
    inject_faults(monkeypatch, loss={1}, grad={2})
    with pytest.raises(SystemExit, match=r"training stopped: 2 non-finite steps in a row \(> --max-bad-steps 1\)"):
        train.main(base_args(tiny_model_dir, toy_data_dir, run, "--max-bad-steps", "1", "--num-samples", "0", "--no-baseline"))  # fmt: skip
    assert not (run / "final").exists() and not (run / "best").exists()
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["status"] == "stopped_bad_steps" and stopped["global_step"] == 2 and stopped["bad_steps_total"] == 2


def test_qlora_nf4_path_trains_on_cpu(tiny_model_dir, toy_data_dir, tmp_path):
    run = tmp_path / "qlora"
    summary = train.main(base_args(tiny_model_dir, toy_data_dir, run, "--quantization", "nf4", "--mixed-precision", "bf16",
                                   "--max-steps", "2", "--num-samples", "0", "--no-baseline"))  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["quantization"] == "nf4" and config["args"]["gradient_checkpointing"] is True
    # bf16 where oneDNN has it; a CPU without AVX512 (AVX2 only) falls back to fp32 with a warning
    assert config["derived"]["mixed_precision"] == ("bf16" if cpu_bf16_supported() else "no")
    losses = step_losses(run)
    assert len(losses) == 2 and all(0 < v < 20 for v in losses.values())
    assert summary["status"] == "max_steps" and (run / "final" / "adapter_model.safetensors").exists()


def test_refuses_existing_run_without_resume(reference_run, tiny_model_dir, toy_data_dir):
    before = (reference_run / "train_log.jsonl").read_text()
    with pytest.raises(SystemExit, match="already holds a run; pass --resume-from latest"):
        train.main(base_args(tiny_model_dir, toy_data_dir, reference_run))
    assert (reference_run / "train_log.jsonl").read_text() == before


def test_accelerate_launch_subprocess(tiny_model_dir, toy_data_dir, tmp_path):
    run = tmp_path / "launched"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
               "--mixed_precision", "no", "--num_machines", "1", "--dynamo_backend", "no",
               str(REPO / "train.py"), *base_args(tiny_model_dir, toy_data_dir, run, "--max-steps", "2", "--num-samples", "0")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2 | loss" in result.stdout and "done: max_steps" in result.stdout
    assert (run / "final" / "adapter_model.safetensors").exists()
    shutil.rmtree(run)


def test_wandb_online_without_login_is_refused_and_offline_works(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_MODE", "online")
    run = tmp_path / "wandb_online"
    with pytest.raises(SystemExit, match="--report-to wandb needs a login: set WANDB_API_KEY"):
        train.main(base_args(tiny_model_dir, toy_data_dir, run, "--report-to", "wandb"))
    assert not run.exists()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = tmp_path / "wandb_offline"
    summary = train.main(base_args(tiny_model_dir, toy_data_dir, run, "--report-to", "wandb", "--max-steps", "1",
                                   "--num-samples", "0", "--no-baseline"))  # fmt: skip
    assert summary["status"] == "max_steps"
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize(
    "requested, device, longest, expected",
    [("auto", "cpu", 512, "eager"), ("auto", "cpu", 513, "sdpa"), ("auto", "cuda", 100, "sdpa"),
     ("sdpa", "cpu", 100, "sdpa"), ("eager", "cuda", 2000, "eager")],
)  # fmt: skip
def test_attention_choice(requested, device, longest, expected):
    assert train.choose_attention(requested, torch.device(device), longest) == expected


def test_attention_and_padding_do_not_change_losses_or_gradients(tiny_model_dir):
    """The auto attention and train.PAD_TO are speed choices only: padded, variable-length batch, fp32; eager on
    rows padded only to the longest is the reference."""
    from common.data import collate_batch, tokenize_records
    from common.lora import apply_lora
    from common.loss import compute_token_losses
    from common.model import load_model_and_tokenizer

    records = [make_conversation(i) for i in range(3)]
    records[0]["messages"][-1]["content"] += " More words here." * 6
    results = {}
    for attn, multiple in (("eager", 1), ("sdpa", 1), ("eager", train.PAD_TO), ("sdpa", train.PAD_TO)):
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
        model.set_attn_implementation(attn)
        model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        examples, _ = tokenize_records(records, tokenizer, 256)
        batch = collate_batch(examples, tokenizer.pad_token_id, pad_to_multiple_of=multiple)
        assert batch["input_ids"].shape[1] % multiple == 0
        loss_sum, _ = compute_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss_sum.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[attn, multiple] = (loss_sum.detach(), grads)
    assert train.PAD_TO == 64 and results["eager", 64][0].shape == results["eager", 1][0].shape
    reference_loss, reference_grads = results["eager", 1]
    for key, (loss, grads) in results.items():
        torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5, msg=str(key))
        for grad, reference_grad in zip(grads, reference_grads):
            torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6, msg=str(key))


def test_compile_keeps_the_losses_samples_and_adapter(tiny_model_dir, toy_data_dir, tmp_path):
    """--compile (the demo's speed choice): the eager run of the same flags is the reference, fp32, dropout 0; the
    layers really ran compiled (dynamo made graphs) and validation / samples ran eagerly after."""
    from torch._dynamo.utils import counters

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        counters.clear()
        runs[name] = tmp_path / name
        train.main(base_args(tiny_model_dir, toy_data_dir, runs[name], "--dropout", "0", "--epochs", "1", *extra))
        graphs = counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (name == "compiled"), (name, graphs)
    assert [json.loads((runs[n] / "config.json").read_text())["derived"]["compiled_layers"] for n in runs] == [0, 2]
    assert step_losses(runs["compiled"]) == pytest.approx(step_losses(runs["eager"]), abs=1e-5)
    evals = [[r["val_loss"] for r in read_jsonl(runs[n] / "eval_log.jsonl")] for n in ("eager", "compiled")]
    assert evals[1] == pytest.approx(evals[0], abs=1e-5)
    samples = [(runs[n] / "samples" / "step_000004.jsonl").read_text() for n in ("eager", "compiled")]
    assert samples[1] == samples[0]
    eager, compiled = (load_file(runs[n] / "final" / "adapter_model.safetensors") for n in ("eager", "compiled"))
    for key, tensor in eager.items():
        torch.testing.assert_close(compiled[key], tensor, atol=1e-5, rtol=1e-4)


def test_eager_modules_runs_compiled_layers_eagerly_then_restores_them(tiny_model_dir):
    from torch._dynamo.utils import counters

    from common.model import load_model_and_tokenizer
    from common.perf import compile_decoder_layers, eager_modules

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    assert compile_decoder_layers(model) == 2
    input_ids, counters["stats"]["unique_graphs"] = torch.tensor([[1, 2, 3, 4]]), 0
    with eager_modules(model):
        expected = model(input_ids).logits
    assert counters["stats"]["unique_graphs"] == 0  # nothing was compiled inside the block
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] > 0  # the compiled forwards are back


def test_memory_preflight_reads_the_loaded_model(tiny_model_dir, toy_data_dir, tmp_path, capsys):
    """LoRA on lm_head too: the pre-flight reads the adapters off the model, logged before the run folder exists."""
    run = tmp_path / "lm_head"
    train.main(base_args(tiny_model_dir, toy_data_dir, run, "--target-modules", "lm_head", "--max-steps", "1",
                         "--num-samples", "0", "--no-baseline"))  # fmt: skip
    verdict = json.loads((run / "config.json").read_text())["derived"]["memory_preflight"]
    assert re.match(r"memory estimate \d+\.\d\d GiB .* for batch \d+ x \d+ tokens \(LoRA, checkpointing off\)", verdict)
    assert verdict in capsys.readouterr().out  # logged before the run folder (and train.log) exists
