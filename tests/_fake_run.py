"""Build a run folder that follows docs/run_folder.md without training, for export/merge tests.

    run_dir = build_fake_run(tmp_path / "runs" / "toy", tiny_model_dir, toy_data_dir)
    run_dir = build_fake_run(tmp_path / "runs" / "toy-qlora", tiny_model_dir, toy_data_dir, quantization="nf4")

The adapter is a real PEFT LoRA (r=4, alpha=8, q/k/v) whose lora_B is a seeded randn * 0.02, so it
changes the logits (a freshly initialised adapter, B = 0, would make every parity check trivial).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from common.model import load_model_and_tokenizer

TARGET_MODULES = ["q_proj", "k_proj", "v_proj"]
BEST_STEP = 20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _sample(i: int) -> dict:
    messages = [
        {"role": "system", "content": "You are an insurance underwriting assistant."},
        {"role": "user", "content": f"Applicant is {40 + i}, non-smoker, wants 250k term life. BMI is 24."},
    ]
    reference = f"Rule L-{1 + i % 3} applies.\nDECISION: approve | CLASS: standard | RULES: L-{1 + i % 3}"
    return {
        "id": f"val-{i:03d}",
        "prompt_messages": messages,
        "reference": reference,
        "generated": f"Rule L-1 sample {i}",
    }


def build_fake_run(
    run_dir: Path,
    model_dir: Path,
    data_dir: Path,
    quantization: str | None = None,
    seed: int = 0,
    extra_args: dict | None = None,
) -> Path:
    """Write config.json, best/, final/, checkpoints/step_000010|20/, logs, samples and summary.json.

    Args:
        run_dir: the run folder to create (runs/<run>).
        model_dir: the base model folder (the tiny model).
        data_dir: folder with train.jsonl / validation.jsonl (their sha256 go into config.json).
        quantization: None for LoRA, "nf4" for a QLoRA adapter trained on the 4-bit base.
        seed: seeds the lora_B perturbation.
        extra_args: merged into config.json["args"] (e.g. a fake token to check redaction).

    Returns:
        `run_dir`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True)
    # like train.py on this CPU: bf16 mixed precision, and a QLoRA base loaded (and quantized) in bf16
    dtype = torch.bfloat16 if quantization == "nf4" else torch.float32
    model, tokenizer = load_model_and_tokenizer(str(model_dir), quantization=quantization, dtype=dtype)
    lora_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)

    import peft
    import transformers

    config = {
        "args": {
            "model": str(model_dir),
            "train_file": str(data_dir / "train.jsonl"),
            "validation_file": str(data_dir / "validation.jsonl"),
            "lr": 2e-4,
            "rank": 4,
            "alpha": 8,
            "dropout": 0.0,
            "target_modules": ",".join(TARGET_MODULES),
            "epochs": 2,
            "batch_size": 4,
            "max_seq_len": 256,
            "max_new_tokens": 64,
            "quantization": quantization,
            "seed": 1234,
            "run_name": run_dir.name,
            **(extra_args or {}),
        },
        "derived": {
            "grad_accum": 1,
            "num_processes": 1,
            "steps_per_epoch": 10,
            "total_steps": 20,
            "warmup_steps": 2,
            "mixed_precision": "bf16",
            "device": "cpu",
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "train_examples": 24,
            "validation_examples": 8,
        },
        "lora": lora_config.to_dict(),
        "versions": {
            "python": "3.11",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "dataset": {
            "train_file": str(data_dir / "train.jsonl"),
            "train_sha256": _sha256(data_dir / "train.jsonl"),
            "validation_file": str(data_dir / "validation.jsonl"),
            "validation_sha256": _sha256(data_dir / "validation.jsonl"),
        },
        "seed": 1234,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    _write_json(run_dir / "config.json", config)

    eval_log = [
        {
            "step": 0,
            "epoch": 0.0,
            "val_loss": 4.8,
            "val_ppl": 121.5,
            "val_tokens": 400,
            "eval_time_s": 0.5,
            "baseline": True,
            "is_best": False,
        },
        {
            "step": 10,
            "epoch": 1.0,
            "val_loss": 3.7,
            "val_ppl": 40.4,
            "val_tokens": 400,
            "eval_time_s": 0.5,
            "baseline": False,
            "is_best": True,
        },
        {
            "step": 20,
            "epoch": 2.0,
            "val_loss": 3.4,
            "val_ppl": 30.0,
            "val_tokens": 400,
            "eval_time_s": 0.5,
            "baseline": False,
            "is_best": True,
        },
    ]
    (run_dir / "eval_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in eval_log))
    (run_dir / "train_log.jsonl").write_text(json.dumps({"type": "step", "step": 20, "epoch": 2.0, "loss": 3.3}) + "\n")
    (run_dir / "samples").mkdir()
    for step in (10, BEST_STEP):
        (run_dir / "samples" / f"step_{step:06d}.jsonl").write_text(
            "".join(json.dumps(_sample(i)) + "\n" for i in range(3))
        )
    summary = {
        "status": "completed",
        "global_step": 20,
        "epochs_completed": 2,
        "best_step": BEST_STEP,
        "best_epoch": 2,
        "best_val_ppl": 30.0,
        "baseline_val_ppl": 121.5,
        "train_time_s": 95.0,
        "tokens_per_s": 850.0,
        "mfu": 0.012,
        "peak_mem_mb": 1234.0,
        "stop_reason": None,
    }
    _write_json(run_dir / "summary.json", summary)

    for folder, step in (("checkpoints/step_000010", 10), ("checkpoints/step_000020", 20), ("best", 20), ("final", 20)):
        path = run_dir / folder
        model.save_pretrained(path)
        _write_json(path / "config.json", config)
        _write_json(path / "trainer_state.json", {"global_step": step})
        if folder in ("best", "final"):
            tokenizer.save_pretrained(path)
            _write_json(
                path / "metrics.json",
                {
                    "val_loss": eval_log[step // 10]["val_loss"],
                    "val_ppl": eval_log[step // 10]["val_ppl"],
                    "step": step,
                    "epoch": step / 10,
                },
            )
        (path / "COMPLETE").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    return run_dir


def write_eval_metrics(run_dir: Path, adapter: Path | None = None) -> Path:
    """Write runs/<run>/eval/metrics.json in evaluate.py's shape (a trimmed test-split result)."""
    path = Path(run_dir) / "eval" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def model_metrics(loss: float, rouge_l: float, accuracy: float) -> dict:
        overall = {
            "n": 6,
            "parse_rate": 1.0,
            "outcome_accuracy": accuracy,
            "risk_class_accuracy": accuracy,
            "rule_f1": accuracy,
        }
        return {
            "loss": {"mean": loss, "low": loss - 0.1, "high": loss + 0.1, "n": 6},
            "perplexity": {"value": math.exp(loss), "low": math.exp(loss - 0.1), "high": math.exp(loss + 0.1)},
            "rouge": {"rouge1": rouge_l + 0.05, "rouge2": rouge_l - 0.05, "rougeL": rouge_l},
            "decision": {"overall": overall, "by_line_of_business": {"term_life": overall}},
            "trained_tokens": 300,
        }

    metrics = {
        "mode": "adapter",
        "adapter": str(adapter or Path(run_dir) / "best"),
        "data_file": "data/test.jsonl",
        "examples": 6,
        "models": {"base": model_metrics(4.77, 0.11, 0.17), "finetuned": model_metrics(3.39, 0.52, 0.67)},
        "comparison": {
            "loss_delta": {"mean": -1.38, "low": -1.5, "high": -1.2},
            "perplexity_ratio": 0.25,
            "significant": True,
        },
    }
    _write_json(path, metrics)
    return path
