"""Memory estimator: component formulas by hand, NF4 bytes, the LoRA/QLoRA decision, and the
estimate against measured peak memory of real training steps on CPU (default and tiny model)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from common.memory import MemoryEstimateError, Setup
from common.memory_estimator import (
    NF4_CONSTANT_BYTES_PER_MATRIX,
    count_architecture_parameters,
    describe_architecture,
    estimate_memory,
    nf4_bytes,
    recommend_setup,
)
from common.memory_measure import compare_to_measurement, measure_in_subprocess
from common.model import load_config
from common.perf import count_matmul_params
from common.preflight import (
    CPU_ALLOCATOR_FRACTION,
    CPU_RUNTIME_BYTES,
    CUDA_ALLOCATOR_FRACTION,
    CUDA_CONTEXT_BYTES,
    ESTIMATE_ERROR_BAND,
    GIB,
    NF4_BITS_PER_PARAM,
    check_fits,
    estimate_step_bytes,
)
from tests.conftest import REPO, load_benchmark

QKV = "q_proj,k_proj,v_proj"


@pytest.fixture
def tiny_config() -> LlamaConfig:
    """hidden 64, MLP 128, 2 layers, 4 heads of 16, 2 kv heads, vocab 1000, tied embeddings."""
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        tie_word_embeddings=True,
    )


def test_parameter_counts_by_hand(tiny_config):
    params = count_architecture_parameters(describe_architecture(tiny_config))
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up/down 64x128
    assert params["linear"] == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    assert params["embedding"] == 1000 * 64
    assert params["head"] == 0  # tied
    assert params["other"] == 2 * 2 * 64 + 64  # two RMSNorms per layer + the final norm
    assert params["total"] == 73728 + 64000 + 320


def test_components_by_hand_cuda_fp16(tiny_config):
    """Batch 2 x 8 tokens, LoRA r=4 on q,v, fp16 weights and autocast, dropout (bool mask on CUDA)."""
    estimate = estimate_memory(tiny_config, Setup(2, 8, 4, ["q_proj", "v_proj"], None, "fp16", False, "cuda"))
    c = estimate["components"]
    tokens, c16 = 16, 2
    assert c["weights"] == 138048 * 2
    lora = 2 * (4 * (64 + 64) + 4 * (64 + 32))  # r * (in + out) for q and v, 2 layers
    assert (c["lora_params"], c["lora_grads"], c["optimizer_states"]) == (4 * lora, 4 * lora, 8 * lora)
    norms = 2 * (4 * tokens * 64 + 4 * tokens)  # fp32 norm input + 1/rms per token, twice per layer
    attention = c16 * tokens * (64 + 64 + 64 + 64)  # q, k, v (repeated to 4 heads: padding mask), output
    attention += 4 * tokens * 4 + c16 * 2 * 8 * 8  # fp32 log-sum-exp per head, fp16 b x s x s mask
    mlp = 3 * tokens * 128 * c16  # gate out, up out, SiLU out
    lora_q = (
        (c16 + 1) * tokens * 64 + c16 * tokens * 4 + c16 * 4 * (64 + 64)
    )  # input copy + bool mask, A out, A/B casts
    lora_v = (c16 + 1) * tokens * 64 + c16 * tokens * 4 + c16 * 4 * (64 + 32)
    layer = norms + attention + mlp + lora_q + lora_v
    assert estimate["details"]["activations_per_layer"] == layer == 37504
    final_norm = 4 * tokens * 64 + 4 * tokens
    assert c["activations"] == 2 * layer + final_norm
    assert c["weight_copies"] == 0  # weights already in the compute dtype
    assert c["logits"] == 12 * 8 * 1000  # 8 trained tokens x vocab x (4 + 4 + 4) bytes
    kept = c["activations"] + c["logits"]
    assert c["overhead"] == round(CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_FRACTION * kept)
    assert estimate["total"] == sum(c.values())

    checkpointed = estimate_memory(tiny_config, Setup(2, 8, 4, "q_proj,v_proj", None, "fp16", True, "cuda"))
    # only each layer's fp16 input is kept, plus one layer live again in its backward
    assert checkpointed["components"]["activations"] == 2 * c16 * tokens * 64 + layer + final_norm


def test_components_cpu_fp32_weights_keep_autocast_copies(tiny_config):
    estimate = estimate_memory(tiny_config, Setup(2, 8, 4, ["q_proj"], None, "fp32", False, "cpu"))
    c = estimate["components"]
    assert estimate["details"]["compute_dtype"] == "bf16"
    assert c["weights"] == 138048 * 4
    # bf16 copy of every decoder linear and of the (tied) LM head, kept for backward
    assert c["weight_copies"] == 2 * 73728 + 2 * 1000 * 64
    kept = c["activations"] + c["weight_copies"] + c["logits"]
    assert c["overhead"] == round(CPU_RUNTIME_BYTES + CPU_ALLOCATOR_FRACTION * kept)


def test_qlora_weights_and_fp32_mlp(tiny_config):
    lora = estimate_memory(tiny_config, Setup(2, 8, 4, ["q_proj"], None, "fp16"))
    qlora = estimate_memory(tiny_config, Setup(2, 8, 4, ["q_proj"], "nf4", "fp16"))
    shapes = [4096, 2048, 2048, 4096, 8192, 8192, 8192]
    # 4-bit decoder linears + fp32 embedding and norms (prepare_model_for_kbit_training upcasts them)
    assert qlora["components"]["weights"] == round(2 * sum(nf4_bytes(n) for n in shapes) + 4 * (64000 + 320))
    # 4-bit linears return fp32 here, so the three MLP intermediates take 4 bytes instead of 2
    extra = qlora["details"]["activations_per_layer"] - lora["details"]["activations_per_layer"]
    assert extra == 3 * 16 * 128 * (4 - 2)


def test_nf4_bytes_per_parameter_with_double_quantization():
    assert round(NF4_BITS_PER_PARAM, 3) == 4.127
    n = 4096 * 4096
    assert 8 * nf4_bytes(n) / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert 8 * nf4_bytes(n) / n < 4.5  # what NF4 costs with fp32 absmax (no double quantization)


def test_nf4_bytes_match_bitsandbytes():
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    weight = torch.randn(1536, 576)
    packed, state = functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    stored = sum(
        t.numel() * t.element_size()
        for t in (packed, state.absmax, state.state2.absmax, state.code, state.state2.code, state.offset)
    )
    assert (state.blocksize, state.state2.blocksize) == (64, 256)
    assert nf4_bytes(weight.numel()) == stored
    tables_and_offset = (state.code.numel() + state.state2.code.numel() + 1) * 4
    assert tables_and_offset == NF4_CONSTANT_BYTES_PER_MATRIX


def test_recommendation_flips_from_lora_to_qlora_as_budget_shrinks():
    config = load_config(str(REPO / "configs/llama-3.2-1b-instruct.json"))
    methods = []
    for budget in (24, 16, 8, 6, 5, 4, 3, 2.5, 2, 1):
        decision = recommend_setup(config, Setup(4, 1024, 16, "all-linear"), budget)
        methods.append(decision["method"])
        if decision["method"] != "none":
            assert decision["estimated_gb"] <= decision["usable_gb"]
            assert decision["micro_batch_size"] * decision["gradient_accumulation_steps"] == 4
    order = {"lora": 0, "qlora": 1, "none": 2}
    assert methods == sorted(methods, key=order.get), methods  # never back to LoRA on a smaller budget
    assert methods[0] == "lora" and "qlora" in methods and methods[-1] == "none"


def test_recommendation_reduces_micro_batch_and_keeps_effective_batch():
    config = load_config(str(REPO / "configs/qwen2.5-0.5b-instruct.json"))
    big = recommend_setup(config, Setup(16, 2048, 16, QKV), 16)
    small = recommend_setup(config, Setup(16, 2048, 16, QKV), 6)
    assert big["micro_batch_size"] >= small["micro_batch_size"] >= 1
    assert small["micro_batch_size"] < 16 and small["effective_batch_size"] == 16
    assert small["gradient_accumulation_steps"] * small["micro_batch_size"] == 16
    assert small["max_micro_batch_size"] >= small["micro_batch_size"]


def within_band(ratio: float) -> bool:
    """Estimated / measured within the band both ways: measured <= estimate x (1 + band), which the advice and
    train.py's pre-flight rely on, and estimate <= measured x (1 + band)."""
    return 1 / (1 + ESTIMATE_ERROR_BAND) <= ratio <= 1 + ESTIMATE_ERROR_BAND


def test_error_band_is_the_measured_cpu_error():
    # tables 1a-1d of memory_profile_cpu.md: estimated / measured of every run (default glibc malloc); the band is
    # the largest error either way, rounded up to a whole percent
    text = (REPO / "benchmarks/results/memory_profile_cpu.md").read_text()
    tables = text.split("## Table 1:")[1].split("## Table 2")[0]
    ratios = [float(row.split("|")[7]) for row in tables.splitlines() if row.startswith(("| LoRA", "| QLoRA"))]
    assert len(ratios) == 6 + 8 + 4 + 2  # table 1a: 6 runs of 5 configurations; 1d: after the heap trim
    assert math.ceil(100 * max(max(r, 1 / r) - 1 for r in ratios)) / 100 == ESTIMATE_ERROR_BAND
    assert all(within_band(r) for r in ratios)


def test_a_7b_model_on_a_t4_is_sent_to_qlora():
    config = load_config(str(REPO / "configs/mistral-7b-instruct-v0.3.json"))
    # Short sequences: the old rule sent it to fp16 LoRA at micro-batch 1, 14.3 of 14.4 GiB usable. Even without
    # the estimator's own error, the micro-batch rule now picks QLoRA, which fits the asked batch of 4.
    unbanded = recommend_setup(config, Setup(4, 256, 16, QKV), 16, error_band=0.0)
    lora = next(c for c in unbanded["candidates"] if c["method"] == "lora" and c["gradient_checkpointing"])
    assert lora["max_micro_batch_size"] == 1
    assert unbanded["method"] == "qlora" and unbanded["micro_batch_size"] == 4
    assert "LoRA on the fp16 base fits only micro-batch 1 of 4" in unbanded["reason"]
    for seq_len in (256, 1024):
        decision = recommend_setup(config, Setup(4, seq_len, 16, QKV), 16)
        assert decision["method"] == "qlora" and decision["micro_batch_size"] == 4, decision["reason"]
        assert decision["gradient_accumulation_steps"] == 1 and decision["headroom_gb"] > 2.5
        assert decision["estimated_with_band_gb"] == pytest.approx(decision["estimated_gb"] * (1 + ESTIMATE_ERROR_BAND))
        assert "LoRA does not fit one sequence" in decision["reason"]
        assert f"{ESTIMATE_ERROR_BAND:.0%} estimate error" in decision["reason"]


def test_lora_at_micro_batch_1_loses_to_qlora_at_the_asked_batch():
    config = load_config(str(REPO / "configs/mistral-7b-instruct-v0.3.json"))
    decision = recommend_setup(config, Setup(4, 1024, 16, QKV), 20)  # LoRA+GC fits 1 sequence (17.8 of 18.0 GiB)
    lora = max(c["max_micro_batch_size"] for c in decision["candidates"] if c["method"] == "lora")
    assert lora == 1
    assert (decision["method"], decision["micro_batch_size"], decision["gradient_accumulation_steps"]) == (
        "qlora",
        4,
        1,
    )
    assert "LoRA on the fp16 base fits only micro-batch 1 of 4" in decision["reason"]
    assert "GiB to spare" in decision["reason"] and decision["headroom_gb"] > 5
    # LoRA that fits the asked batch still wins: no quantization error, faster steps
    roomy = recommend_setup(config, Setup(4, 1024, 16, QKV), 24)
    assert roomy["method"] == "lora" and roomy["micro_batch_size"] == 4
    # and QLoRA must do better than micro-batch 1 to take over
    single = recommend_setup(config, Setup(1, 1024, 16, QKV), 20)
    assert single["method"] == "lora" and single["micro_batch_size"] == 1


def peft_model(config, dtype: torch.dtype, targets: str, quantized: bool = False, attention: str = "sdpa"):
    """`config`'s model with LoRA r=16 on `targets`: weightless (meta device), or the default model in NF4."""
    from transformers import AutoModelForCausalLM

    from common.lora import apply_lora, parse_target_modules
    from common.model import load_model_and_tokenizer

    if quantized:
        model = load_model_and_tokenizer("smollm2-135m-instruct", quantization="nf4", dtype=dtype)[0]
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._attn_implementation = attention
    return apply_lora(model, 16, 32, 0.05, parse_target_modules(targets), quantized=quantized)


def test_check_fits_and_bad_settings(tiny_config):
    model = peft_model(tiny_config, torch.float16, "q_proj")
    total, band = estimate_step_bytes(model, 2, 64, torch.float16, "cuda", False, 0.05), ESTIMATE_ERROR_BAND
    fits, message = check_fits(total, "cuda", "batch 2 x 64 tokens", budget_bytes=GIB)
    assert fits and "GiB" in message
    assert not check_fits(total, "cuda", "batch 2 x 64 tokens", budget_bytes=100 * 2**20)[0]
    assert check_fits(total, "mps", "batch 2 x 64 tokens")[0]  # not modelled: no verdict
    fits, message = check_fits(total, "cuda", "batch 2 x 64 tokens", budget_bytes=round(total * (1.01 + band) / 0.9))
    assert fits and f"memory estimate {total / GIB:.2f} GiB (+{band:.0%} estimate error" in message
    fits, message = check_fits(total, "cuda", "b", budget_bytes=round(total * (0.99 + band) / 0.9))  # not with the band
    assert not fits and f"+{band:.0%} estimate error" in message
    with pytest.raises(MemoryEstimateError, match="qkv_proj"):
        estimate_memory(tiny_config, Setup(2, 64, 4, "qkv_proj"))
    with pytest.raises(MemoryEstimateError, match="quantization"):
        estimate_memory(tiny_config, Setup(2, 64, 4, "q_proj", "int8"))


def test_train_check_memory_logs_warns_or_refuses(tiny_config, caplog, monkeypatch):
    import train

    flags = {"batch_size": 2, "max_seq_len": 48, "rank": 4, "target_modules": QKV, "quantization": None}
    args = argparse.Namespace(**flags, gradient_checkpointing=False, dropout=0.05, strict_memory=False)
    logger, model = logging.getLogger("test_check_memory"), peft_model(tiny_config, torch.float32, QKV)
    with caplog.at_level(logging.INFO, logger="test_check_memory"):
        line = train.check_memory(model, args, torch.device("cpu"), torch.float32, 64, logger)
    # the longest row (64) capped by --max-seq-len (48); fp32 on CPU is fp32 compute
    expected = estimate_step_bytes(model, 2, 48, torch.float32, "cpu", False, 0.05)
    assert line.startswith(f"memory estimate {expected / GIB:.2f} GiB") and "batch 2 x 48 tokens (LoRA" in line
    assert caplog.records[-1].levelno == logging.INFO and caplog.records[-1].message == line
    args.batch_size = 2**40  # never fits: a warning, or with --strict-memory a refusal naming the remedies
    line = train.check_memory(model, args, torch.device("cpu"), torch.float32, 64, logger)
    assert caplog.records[-1].levelno == logging.WARNING and "--quantization nf4" in line
    assert "--gradient-checkpointing" in line and "profile_memory.py" in line
    args.strict_memory = True
    with pytest.raises(SystemExit, match=r"error: memory estimate .* try lower --batch-size"):
        train.check_memory(model, args, torch.device("cpu"), torch.float32, 64, logger)
    # an architecture the estimate cannot read (no intermediate_size): skipped and logged, even with --strict-memory
    sizes = {k: getattr(tiny_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")}
    text = SimpleNamespace(model_type="llama", vocab_size=1000, **sizes)
    monkeypatch.setattr(model.get_base_model().config, "get_text_config", lambda *args, **kwargs: text)
    line = train.check_memory(model, args, torch.device("cpu"), torch.float32, 64, logger)
    assert line == "memory estimate skipped: config of model_type 'llama' has no intermediate_size"


def test_matmul_count_sees_each_4bit_linear_once():
    """PEFT wraps a 4-bit linear in its own `Linear4bit`: the FLOP count (MFU, the pre-flight) counts the base once."""
    config = load_config("smollm2-135m-instruct")
    lora = count_matmul_params(peft_model(config, torch.bfloat16, QKV))
    qlora = count_matmul_params(peft_model(config, torch.bfloat16, QKV, quantized=True))
    assert qlora == lora and lora["body"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


# train.py's pre-flight (read off the model) against the full estimate (from the config) on the default model,
# GiB (2026-12-05): pre-flight / full
#   cuda-lora-4x1024 5.238 / 5.268 | cuda-lora-gc-4x1024 2.260 / 2.270 | cuda-qlora-4x1024 6.362 / 6.392
#   cuda-qlora-gc-all-linear-4x1024 2.504 / 2.514 | cpu-lora-fp32-eager-4x512 6.891 / 6.911
#   cpu-lora-bf16-gc-eager-all-linear-4x512 1.705 / 1.713 | cpu-qlora-eager-2x256 1.808 / 1.816
#   cpu-qlora-gc-sdpa-4x1024 2.786 / 2.800: 0.3-0.6% under, every one
QUICK_SETTINGS = [
    pytest.param("cuda", None, "fp16", False, 4, 1024, QKV, id="cuda-lora-4x1024"),
    pytest.param("cuda", None, "fp16", True, 4, 1024, QKV, id="cuda-lora-gc-4x1024"),
    pytest.param("cuda", "nf4", "fp16", False, 4, 1024, QKV, id="cuda-qlora-4x1024"),
    pytest.param("cuda", "nf4", "fp16", True, 4, 1024, "all-linear", id="cuda-qlora-gc-all-linear-4x1024"),
    pytest.param("cpu", None, "fp32", False, 4, 512, QKV, id="cpu-lora-fp32-eager-4x512"),
    pytest.param("cpu", None, "bf16", True, 4, 512, "all-linear", id="cpu-lora-bf16-gc-eager-all-linear-4x512"),
    pytest.param("cpu", "nf4", "bf16", False, 2, 256, QKV, id="cpu-qlora-eager-2x256"),
    pytest.param("cpu", "nf4", "bf16", True, 4, 1024, QKV, id="cpu-qlora-gc-sdpa-4x1024"),
]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.mark.parametrize(("device", "quantization", "dtype", "gc", "batch", "seq_len", "targets"), QUICK_SETTINGS)
def test_preflight_within_1_percent_under_the_full_estimate(device, quantization, dtype, gc, batch, seq_len, targets):
    """The pre-flight leaves out only small, positive terms: never above the full estimate, at most 1% under it."""
    config = load_config("smollm2-135m-instruct")
    # train.py runs eager attention on CPU up to 512 tokens (its s^2 probabilities are the largest term there)
    config._attn_implementation = "eager" if device == "cpu" and seq_len <= 512 else "sdpa"
    setup = Setup(batch, seq_len, 16, targets, quantization, dtype, gc, device)
    model = peft_model(config, DTYPES[dtype], targets, bool(quantization), config._attn_implementation)
    compute = DTYPES[setup.dtype_names()[1]]  # fp32 on CPU: bf16 autocast, as the full estimate assumes
    quick = estimate_step_bytes(model, batch, seq_len, compute, device, gc, 0.05)
    full = estimate_memory(config, setup)["total"]
    assert 0.99 * full <= quick <= full, (quick / GIB, full / GIB, quick / full)


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("smollm2-135m-instruct", 0.1345),
        ("qwen2.5-0.5b-instruct", 0.494),
        ("llama-3.2-1b-instruct", 1.236),
        ("qwen2.5-3b-instruct", 3.086),
        ("llama-3.2-3b-instruct", 3.213),
        ("mistral-7b-instruct-v0.3", 7.248),
        ("qwen2.5-7b-instruct", 7.616),
    ],
)
def test_shipped_configs_match_published_parameter_counts(name, billions):
    params = count_architecture_parameters(describe_architecture(load_config(str(REPO / f"configs/{name}.json"))))
    assert params["total"] / 1e9 == pytest.approx(billions, rel=0.005)


def test_script_writes_table_and_recommendation(tmp_path, capsys):
    from profile_memory import main

    report = main(["--model", str(REPO / "configs/mistral-7b-instruct-v0.3.json"), "--run-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| **total** |" in out and "QLoRA+GC" in out and "recommendation: QLoRA" in out
    saved = json.loads((tmp_path / "memory_profile.json").read_text())
    assert saved["recommendation"]["method"] == report["recommendation"]["method"] == "qlora"
    assert set(saved["estimates"]) == {"LoRA", "LoRA+GC", "QLoRA", "QLoRA+GC"}


# --- estimate vs measured: real training steps in a fresh process, peak RSS minus the bare import ---


def _measured_ratio(
    model: str,
    quantization: str | None,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    extra_env: dict | None = None,
    compute: str = "bf16",
) -> tuple[dict, dict, dict]:
    # LoRA keeps the base in fp32 on a CPU, QLoRA computes in `compute`; autocast in `compute` (none for fp32)
    dtype = compute if quantization else "fp32"
    setup = Setup(batch_size, seq_len, 16, QKV, quantization, dtype, checkpointing, "cpu", compute_dtype=compute)
    measurement = measure_in_subprocess(model, setup, steps=2, extra_env=extra_env)
    setup.trained_fraction = measurement["trained_tokens"] / (batch_size * seq_len)
    estimate = estimate_memory(load_config(model), setup)
    return compare_to_measurement(estimate, measurement), measurement, estimate


# Table 1a of benchmarks/results/memory_profile_cpu.md: LoRA and QLoRA in bf16 autocast, gradient
# checkpointing off and on, 256 and 512 tokens, all eight marked slow (bf16 is emulated on CPUs without
# AVX512-BF16 / AMX: 3 minutes a run): `python -m pytest -q -m slow tests/test_memory.py`. By default one LoRA
# and one QLoRA run in fp32 (table 3), what train.py's `auto` trains in on such CPUs.
MEASURED = [
    pytest.param(q, n, gc, id=f"{'qlora' if q else 'lora'}-{n}{'-checkpointing' if gc else ''}", marks=pytest.mark.slow)
    for q, n, gc in [(None, 256, False), (None, 512, False), (None, 256, True), (None, 512, True),
                     ("nf4", 256, False), ("nf4", 256, True), ("nf4", 512, False), ("nf4", 512, True)]
]  # fmt: skip


@pytest.mark.parametrize(("quantization", "seq_len", "checkpointing"), MEASURED)
def test_estimate_within_tolerance_of_measured_default_model(quantization, seq_len, checkpointing, record_property):
    compared, measurement, _ = _measured_ratio("smollm2-135m-instruct", quantization, 2, seq_len, checkpointing)
    ratio = compared["ratio"]
    for key in ("estimated_bytes", "measured_bytes", "ratio"):  # `pytest --junitxml` keeps them with the test
        record_property(key, compared[key])
    assert measurement["peak_reset"]  # the peak is the training steps', not the loading's
    assert within_band(ratio), (ratio, measurement["measured_bytes"] / 2**20)


def test_fp32_estimate_within_tolerance_of_measured_default_model(record_property):
    """LoRA 2 x 256 in fp32 (no autocast), glibc's default malloc: held to the band the advice uses."""
    compared, measurement, _ = _measured_ratio("smollm2-135m-instruct", None, 2, 256, compute="fp32")
    record_property("ratio", compared["ratio"])
    assert measurement["peak_reset"] and measurement["compute_dtype"] == "fp32"
    assert within_band(compared["ratio"]), (compared["ratio"], measurement["measured_bytes"] / 2**20)


def test_qlora_tensor_terms_match_the_live_tensor_peak_of_the_default_model(record_property):
    """QLoRA + checkpointing, the recommendation for big models on a small GPU, term by term: with glibc
    returning every freed buffer at once (MALLOC_MMAP_THRESHOLD_), peak RSS is the live-tensor peak, the
    same on any machine, and the estimate without its allocator allowance must meet it within 10%
    (table 2 of memory_profile_cpu.md: +1..+7%). The default-malloc peak of the same run wanders by
    ~15% between runs (table 1), which the 20% band covers, not this test. Computes in fp32 (fast on any CPU),
    which also checks that loading lets go of the checkpoint file's pages (fp32 weights were views of it)."""
    fixed = {"MALLOC_MMAP_THRESHOLD_": "131072"}
    compared, measurement, estimate = _measured_ratio(
        "smollm2-135m-instruct", "nf4", 2, 256, True, extra_env=fixed, compute="fp32"
    )
    live = compared["estimated_bytes"] - estimate["details"]["allocator_allowance"]
    record_property("live_estimate_bytes", live)
    record_property("measured_bytes", measurement["measured_bytes"])
    assert measurement["peak_reset"]
    assert 1 / 1.1 <= live / measurement["measured_bytes"] <= 1.1, (live / 2**20, measurement["measured_bytes"] / 2**20)


def test_measure_flag_on_tiny_model(tiny_model_dir, tmp_path, capsys, record_property):
    from profile_memory import main

    report = main(
        [
            "--model",
            str(tiny_model_dir),
            "--measure",
            "--device",
            "cpu",
            "--method",
            "lora",
            "--batch-size",
            "2",
            "--seq-len",
            "128",
            "--output",
            str(tmp_path / "profile.json"),
        ]
    )
    measured = report["measurement"]
    record_property("ratio", measured["ratio"])
    assert measured["device"] == "cpu" and measured["measured_bytes"] > 0 and len(measured["losses"]) == 2
    assert measured["ratio"] == pytest.approx(measured["estimated_bytes"] / measured["measured_bytes"])
    # The tiny model's estimate is mostly the fixed CPU allowance, so its ratio wanders with the process
    # (1.06-1.24 in three one-thread runs, 1.13-1.14 at two threads): the band is held on the default model.
    assert 0.5 < measured["ratio"] < 2, measured["ratio"]
    assert f"ratio {measured['ratio']:.2f}" in capsys.readouterr().out


def test_readme_and_the_results_file_show_the_memory_table_the_estimator_gives():
    # README's T4 table (seq 1024) and benchmarks/results/memory_table.md, row for row, against the
    # table benchmarks/memory_table.py builds from configs/ now: a change to the estimator or the
    # recommendation that is not re-published fails here.
    bench = load_benchmark("memory_table")
    rows = bench.build_fit_table(bench.parse_args([]))[2:]
    readme_rows = [line for line in (REPO / "README.md").read_text().splitlines() if "B | 1024 |" in line]
    assert readme_rows and readme_rows == [row for row in rows if "B | 1024 |" in row]
    published = (REPO / "benchmarks" / "results" / "memory_table.md").read_text().splitlines()
    assert [line for line in published if line.startswith("| ") and "B | " in line] == rows
