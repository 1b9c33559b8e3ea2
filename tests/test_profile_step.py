"""benchmarks/profile_step.py: ops sorted into the right kinds, typical batches, a real profiled run on the tiny model."""

from __future__ import annotations

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("profile_step")


@pytest.mark.parametrize(
    "name, in_optimizer, kind",
    [
        ("aten::mm", False, "matmul"),
        ("aten::addmm", False, "matmul"),
        ("aten::bmm", False, "matmul"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", False, "attention"),
        ("aten::_softmax", False, "attention"),
        ("aten::_to_copy", False, "casts and copies"),
        ("aten::copy_", False, "casts and copies"),
        ("aten::mul", False, "other element-wise and glue"),
        ("aten::_foreach_mul_", True, "optimizer"),
        ("aten::mm", True, "optimizer"),  # anything inside the optimizer's step is the optimizer's
    ],
)
def test_op_kind(bench, name, in_optimizer, kind):
    assert bench.op_kind(name, in_optimizer) == kind


def test_typical_batches_take_the_examples_around_the_median_length(bench):
    examples = [
        {"input_ids": [1] * n, "labels": [-100] + [1] * (n - 1), "index": i} for i, n in enumerate(range(10, 0, -1))
    ]
    batches = bench.typical_batches(examples, batch_size=2, count=2, pad_token_id=0)
    # lengths 1..10 sorted; the middle four are 4, 5, 6, 7, in batches of two, right-padded
    assert [b["attention_mask"].sum(1).tolist() for b in batches] == [[4, 5], [6, 7]]
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}
    # around length 9: the four longest that fit below the end, 7..10
    near = bench.typical_batches(examples, batch_size=2, count=2, pad_token_id=0, near=9)
    assert [b["attention_mask"].sum(1).tolist() for b in near] == [[7, 8], [9, 10]]
    near = bench.typical_batches(examples, batch_size=1, count=2, pad_token_id=0, near=3)
    assert [b["attention_mask"].sum(1).tolist() for b in near] == [[2], [3]]
    with pytest.raises(SystemExit, match="cannot fill 6 batches of 2"):
        bench.typical_batches(examples, batch_size=2, count=6, pad_token_id=0)


def test_profiles_a_real_step_on_the_tiny_model(bench, tiny_model_dir, toy_data_dir, tmp_path):
    out = tmp_path / "profile.md"
    argv = ["--model", str(tiny_model_dir), "--train-file", str(toy_data_dir / "train.jsonl"), "--precision", "no"]
    figures = bench.main([*argv, "--warmup", "1", "--steps", "3", "--batch-size", "2", "--output", str(out)])
    kinds, phases = figures["kinds"], figures["phases"]
    assert list(kinds) == bench.KINDS and sum(kinds.values()) == pytest.approx(1.0)
    # every kind a LoRA step has shows up: AdamW's work is found inside its step's span
    assert kinds["matmul"] > 0.05 and kinds["optimizer"] > 0 and kinds["casts and copies"] > 0
    assert set(phases) == {"forward", "backward", "optimizer"} and 0.8 < sum(phases.values()) <= 1.0
    assert (
        figures["precision"] == "no"
        and figures["attention"] == "eager"
        and figures["tokens_per_s"] > 0
        and 0 < figures["mfu"] < 1
    )
    text = out.read_text()
    assert "| matmul |" in text and "tokens/s" in text and "precision no (fp32 base)" in text
