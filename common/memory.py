"""Training-memory estimate from a model config, the LoRA-vs-QLoRA decision, and its measurement.

    from common.memory import estimate_memory, recommend_setup, check_fits
    estimate = estimate_memory(config, batch_size=4, seq_len=1024, rank=16, target_modules=["q_proj", "v_proj"],
                               quantization="nf4", dtype="fp16", gradient_checkpointing=True)
    estimate["total"], estimate["components"]          # bytes, and bytes per component
    decision = recommend_setup(config, gpu_memory_gb=16, batch_size=4, seq_len=1024, rank=16, target_modules="all-linear")
    fits, message = check_fits(config, "cuda", budget_bytes=None, ...)   # the pre-flight check train.py runs

The estimate is a pure function of the config (no weights) and the training settings. Every term
is counted from first principles for a Llama-style decoder (q/k/v/o attention, gated SiLU MLP,
RMSNorm) trained the way `train.py` trains it: frozen base, LoRA adapters in fp32, AdamW, autocast
in `compute_dtype`, the loss of `common.loss` (LM head only on trained positions). Peak memory
is taken at the start of the backward pass, when every saved activation and the loss buffers are
alive at once:

    weights               frozen base: params x bytes(dtype); NF4 = 4.127 bits/param on the decoder
                          linears (+ fp32 embeddings, head, norms: prepare_model_for_kbit_training
                          casts every non-4-bit parameter to fp32)
    lora_params/_grads    adapter params r*(in+out) per targeted linear, fp32 (4 B), grads fp32 (4 B)
    optimizer_states      AdamW exp_avg + exp_avg_sq, fp32 (8 B per adapter param)
    activations           tensors autograd saves for backward, per layer (list in `_layer_activation_bytes`)
    weight_copies         autocast's compute-dtype copy of every frozen fp32 weight it multiplies,
                          kept for backward (only when weights are stored in fp32, e.g. LoRA on CPU)
    logits                12 B x trained tokens x vocab: fp32 log-probs saved by cross-entropy, their
                          gradient and the logits' gradient, all alive in the first backward op
    overhead              stated allowance: CUDA context + caching-allocator slack on GPU; libraries
                          and malloc retention on CPU (see CUDA_* and CPU_* below)

`measure_in_subprocess` runs a few real training steps in a fresh process and reports the peak
(CUDA max allocated/reserved, or CPU peak RSS minus a bare `import torch, transformers`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

MIB = 2**20
GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# NF4 with double quantization (QLoRA paper, bitsandbytes defaults): 4-bit codes, one absmax per
# block of 64 weights stored as 8-bit, one fp32 absmax per 256 of those: 4 + 8/64 + 32/(64*256) bits.
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_BITS_PER_PARAM = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)
# per quantized matrix: 16-entry NF4 code, 256-entry fp32 code of the 8-bit absmax, fp32 offset
NF4_CONSTANT_BYTES_PER_MATRIX = (16 + 256 + 1) * 4

# Adapters train in fp32 whatever the base dtype (PEFT upcasts them): param, grad, AdamW m and v.
ADAPTER_BYTES = {"lora_params": 4, "lora_grads": 4, "optimizer_states": 8}

# Stated allowances (not derived from the config):
# - GPU: the CUDA context and cuBLAS workspaces live outside PyTorch's allocator; the caching
#   allocator keeps freed blocks and rounds sizes (reserved > allocated).
CUDA_CONTEXT_BYTES = 512 * MIB
CUDA_ALLOCATOR_FRACTION = 0.10
# - CPU: what the training process holds beyond `import torch, transformers` besides tensors
#   (model code, peft, bitsandbytes and the tokenizer: measured ~225 MiB for the default model), and
#   glibc malloc retention: activation buffers freed in forward leave holes in the heap that later,
#   differently sized allocations cannot reuse, so peak RSS exceeds the live-tensor peak by
#   0.24-0.95 x (activations + weight copies + logits) in our runs (LoRA and QLoRA, with and without
#   checkpointing, two lengths, mean 0.6; it even varies run to run). 0.5 is a round value in
#   that range: a stated allowance, not a derived term. With MALLOC_MMAP_THRESHOLD_ fixed the gap vanishes and the
#   estimate without it is within +1..+6% of the peak. See benchmarks/results/memory_profile_cpu.md.
CPU_RUNTIME_BYTES = 224 * MIB
CPU_ALLOCATOR_FRACTION = 0.50

DEFAULT_GPU_MEMORY_GB = 16.0  # a T4
DEFAULT_SAFETY_MARGIN = 0.10
# The estimator's own error: every configuration of benchmarks/results/memory_profile_cpu.md (table 1:
# LoRA and QLoRA, with and without checkpointing, 2 x 256 and 2 x 512, default glibc malloc) measured
# within +-11% of its estimate, and one repeated configuration spread 0.99-1.16. An option fits only when
# estimate x (1 + band) fits. The GPU band is not measured yet (benchmarks/gpu_check.py measures it):
# until then the CPU band stands for both.
ESTIMATE_ERROR_BAND = 0.11
DEFAULT_TRAINED_FRACTION = 0.5


class MemoryEstimateError(ValueError):
    """The config or the settings cannot be estimated; the message says what to change."""


def describe_architecture(config) -> dict:
    """Read the sizes the estimate needs from a transformers config.

    Args:
        config: a `PretrainedConfig` of a Llama-style decoder (llama, mistral, qwen2, qwen3, ...).

    Returns:
        {"model_type", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab",
         "tied", "qkv_bias", "o_bias", "qk_norm", "max_positions", "attention"}

    Raises:
        MemoryEstimateError: the config lacks a field of a Llama-style decoder.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    missing = [
        name
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        if getattr(text, name, None) is None
    ]
    if missing:
        raise MemoryEstimateError(
            f"config of model_type '{getattr(text, 'model_type', '?')}' has no {', '.join(missing)}; "
            "the estimator supports Llama-style decoders (llama, mistral, qwen2, qwen3)"
        )
    heads = text.num_attention_heads
    model_type = getattr(text, "model_type", "")
    attention_bias = bool(getattr(text, "attention_bias", False))
    return {
        "model_type": model_type,
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "intermediate": text.intermediate_size,
        "vocab": text.vocab_size,
        "tied": bool(getattr(text, "tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama-style configs say so with attention_bias
        "qkv_bias": model_type == "qwen2" or attention_bias,
        "o_bias": attention_bias and model_type != "qwen2",
        "qk_norm": model_type == "qwen3",
        "max_positions": getattr(text, "max_position_embeddings", None),
        "attention": getattr(text, "_attn_implementation", None) or "sdpa",
    }


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer."""
    q_dim, kv_dim = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    hidden, inter = arch["hidden"], arch["intermediate"]
    return {
        "q_proj": (hidden, q_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (q_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def resolve_target_modules(target_modules: list[str] | str) -> list[str]:
    """Turn `--target-modules` (a list, a comma-separated string or "all-linear") into module names.

    Raises:
        MemoryEstimateError: a name is not one of the decoder's linear layers.
    """
    if isinstance(target_modules, str):
        target_modules = (
            list(LINEAR_MODULES)
            if target_modules.strip() == "all-linear"
            else [n.strip() for n in target_modules.split(",") if n.strip()]
        )
    unknown = [name for name in target_modules if name not in LINEAR_MODULES]
    if unknown or not target_modules:
        raise MemoryEstimateError(
            f"target modules {unknown or target_modules} unknown; use names from {', '.join(LINEAR_MODULES)} or all-linear"
        )
    return [name for name in LINEAR_MODULES if name in target_modules]


def count_architecture_parameters(arch: dict) -> dict:
    """Parameter counts of the base model, split as the estimate needs them.

    Returns:
        {"linear": decoder linear weights (the 4-bit part under QLoRA), "embedding", "head" (0 when
         tied), "other": norms and biases, "total"}
    """
    per_layer_linear = sum(i * o for i, o in linear_shapes(arch).values())
    q_dim, kv_dim = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    per_layer_other = 2 * arch["hidden"]  # input and post-attention RMSNorm
    per_layer_other += (q_dim + 2 * kv_dim) if arch["qkv_bias"] else 0
    per_layer_other += arch["hidden"] if arch["o_bias"] else 0
    per_layer_other += 2 * arch["head_dim"] if arch["qk_norm"] else 0
    counts = {
        "linear": arch["layers"] * per_layer_linear,
        "embedding": arch["vocab"] * arch["hidden"],
        "head": 0 if arch["tied"] else arch["vocab"] * arch["hidden"],
        "other": arch["layers"] * per_layer_other + arch["hidden"],  # + final norm
    }
    counts["total"] = sum(counts.values())
    return counts


def nf4_bytes(num_params: int) -> float:
    """Bytes of one weight matrix of `num_params` weights in NF4 with double quantization.

    Args:
        num_params: weights in the matrix (bitsandbytes quantizes each matrix on its own).

    Returns:
        0.5 B per weight + one uint8 absmax per block of 64 weights + one fp32 absmax per 256 of those
        + the matrix's code tables and offset: `NF4_BITS_PER_PARAM` (4.127) bits per weight in the limit.
    """
    absmax = math.ceil(num_params / NF4_BLOCKSIZE)
    return (
        math.ceil(num_params / 2)
        + absmax
        + 4 * math.ceil(absmax / NF4_NESTED_BLOCKSIZE)
        + NF4_CONSTANT_BYTES_PER_MATRIX
    )


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "no": "fp32"}.get(dtype, dtype)
    if dtype not in DTYPE_BYTES:
        raise MemoryEstimateError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got '{dtype}'")
    return dtype


def _layer_activation_bytes(
    arch: dict,
    batch: int,
    seq: int,
    targets: list[str],
    rank: int,
    c: int,
    mlp_bytes: int,
    mask_bytes: int,
    padded: bool,
) -> int:
    """Bytes one decoder layer saves for backward (frozen base, LoRA on `targets`).

    Frozen linears save no input (only their weight); what is saved:
      2 RMSNorms    the fp32 input of the norm math (4 B x T x hidden) + 1/rms per token (4 B x T)
      attention     SDPA flash/memory-efficient kernels keep q, k, v, output (c B each) and the fp32
                    log-sum-exp per head, never the s x s matrix. With a padding mask transformers
                    repeats k/v to all heads (GQA only without a mask) and SDPA keeps a float copy of
                    the mask per layer (c B x b x s^2). Eager attention also keeps the probabilities:
                    fp32 softmax + its c-byte copy (b x heads x s^2 x (4 + c)).
      MLP           gate output (SiLU input), up output, SiLU output: 3 x T x intermediate x mlp_bytes
      LoRA module   the adapter input in compute dtype (c B x T x in), the dropout mask (`mask_bytes`
                    x T x in: fp32 noise on CPU, bool on CUDA, none without dropout) and A's output
                    (c B x T x r); plus the compute-dtype copies of A and B.
    """
    tokens = batch * seq
    hidden, heads, head_dim = arch["hidden"], arch["heads"], arch["head_dim"]
    q_dim = heads * head_dim
    kv_dim = q_dim if padded or arch["attention"] == "eager" else arch["kv_heads"] * head_dim
    total = 2 * (4 * tokens * hidden + 4 * tokens)
    total += c * tokens * (2 * q_dim + 2 * kv_dim)  # q, k, v, attention output
    if arch["attention"] == "eager":
        total += (4 + c) * batch * heads * seq * seq
    else:
        total += 4 * tokens * heads  # log-sum-exp
    if padded:
        total += c * batch * seq * seq
    total += 3 * tokens * arch["intermediate"] * mlp_bytes
    for name in targets:
        in_features, out_features = linear_shapes(arch)[name]
        total += (c + mask_bytes) * tokens * in_features + c * tokens * rank + c * rank * (in_features + out_features)
    return total


def estimate_memory(
    config,
    batch_size: int,
    seq_len: int,
    rank: int,
    target_modules: list[str] | str,
    quantization: str | None,
    dtype: str | torch.dtype,
    gradient_checkpointing: bool,
    trained_fraction: float = DEFAULT_TRAINED_FRACTION,
    *,
    device: str = "cuda",
    compute_dtype: str | torch.dtype | None = None,
    lora_dropout: float = 0.05,
    padded: bool = True,
) -> dict:
    """Estimate the peak memory of one LoRA/QLoRA training step, per component, in bytes.

    Args:
        config: transformers config of the base model (no weights needed).
        batch_size: sequences per micro-batch.
        seq_len: tokens per sequence (padded length).
        rank: LoRA rank r.
        target_modules: module names, a comma-separated string, or "all-linear".
        quantization: None (LoRA) or "nf4" (QLoRA, 4-bit NF4 + double quantization).
        dtype: as passed to `load_model_and_tokenizer`: the stored dtype of the base weights for LoRA
            ("fp32" on CPU, where autocast keeps fp32 weights; "fp16"/"bf16" on GPU); the compute
            dtype for "nf4".
        gradient_checkpointing: recompute each decoder layer in backward (only layer inputs kept).
        trained_fraction: share of the batch's tokens with a label (assistant tokens): the loss
            applies the LM head only there, so logits memory scales with it.
        device: "cuda" or "cpu": sets the overhead allowance and the dropout mask size.
        compute_dtype: autocast dtype; default `dtype` when it is 16-bit, else bf16 on CPU and fp16
            on CUDA (a T4 has no bf16).
        lora_dropout: adapter dropout probability (> 0 saves a dropout mask per adapter).
        padded: batches carry a padding mask (right-padded batches of unequal lengths), which makes
            SDPA keep a b x s^2 mask per layer and expands k/v to all heads.

    Returns:
        {"components": {name: bytes}, "total": bytes, "details": {...counts and assumptions...}}

    Raises:
        MemoryEstimateError: unknown quantization, dtype, device or target module, or bad sizes.
    """
    _check_estimate_settings(quantization, device, batch_size, seq_len, rank, trained_fraction)
    settings = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "rank": rank,
        "target_modules": None,  # the resolved names, below
        "quantization": quantization,
        "gradient_checkpointing": gradient_checkpointing,
        "trained_fraction": trained_fraction,
        "device": device,
        "lora_dropout": lora_dropout,
        "padded": padded,
    }
    arch = describe_architecture(config)
    targets = resolve_target_modules(target_modules)
    dtype = _dtype_name(dtype)
    if compute_dtype is None:
        compute_dtype = dtype if dtype != "fp32" else ("bf16" if device == "cpu" else "fp16")
    compute_dtype = _dtype_name(compute_dtype)
    c = DTYPE_BYTES[compute_dtype]
    params = count_architecture_parameters(arch)
    layers, hidden, vocab = arch["layers"], arch["hidden"], arch["vocab"]
    shapes = linear_shapes(arch)

    weights, stored_bytes = _weight_bytes(quantization, params, layers, shapes, dtype)
    # 4-bit linears return their input dtype (fp32 here), so QLoRA's MLP intermediates are fp32.
    mlp_bytes = stored_bytes if quantization == "nf4" else c

    lora_params = layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in targets)
    # CUDA's fused dropout keeps a bool mask; CPU keeps the noise in the (fp32) adapter dtype
    mask_bytes = 0 if lora_dropout <= 0 else 1 if device == "cuda" else 4
    layer_bytes = _layer_activation_bytes(arch, batch_size, seq_len, targets, rank, c, mlp_bytes, mask_bytes, padded)
    tokens = batch_size * seq_len
    final_norm = 4 * tokens * hidden + 4 * tokens
    # with checkpointing each layer keeps its input; one layer is live again during its backward
    kept_layers = (
        layers * stored_bytes * tokens * hidden + layer_bytes if gradient_checkpointing else layers * layer_bytes
    )
    activations = kept_layers + final_norm

    weight_copies = _weight_copy_bytes(
        quantization, stored_bytes, c, params["linear"], vocab * hidden, layers, gradient_checkpointing
    )
    trained_tokens = max(1, round(tokens * trained_fraction))
    logits = 12 * trained_tokens * vocab
    kept_for_backward = activations + weight_copies + logits
    fixed, allocator, overhead_note = _overhead_bytes(device, kept_for_backward)
    adapter = {name: per_param * lora_params for name, per_param in ADAPTER_BYTES.items()}
    components = {"weights": weights, **adapter, "activations": activations, "weight_copies": weight_copies}
    components |= {"logits": logits, "overhead": fixed + allocator}
    components = {name: round(value) for name, value in components.items()}
    return {
        "components": components,
        "total": sum(components.values()),
        "details": {
            "architecture": arch,
            "params": params,
            "lora_params": lora_params,
            "tokens": tokens,
            "trained_tokens": trained_tokens,
            "activations_per_layer": layer_bytes,
            "weight_dtype": "nf4" if quantization == "nf4" else dtype,
            "compute_dtype": compute_dtype,
            "nf4_bits_per_param": NF4_BITS_PER_PARAM,
            "settings": settings | {"target_modules": targets},
            "overhead": overhead_note,
            "allocator_allowance": round(allocator),
        },
    }


def _check_estimate_settings(
    quantization: str | None, device: str, batch_size: int, seq_len: int, rank: int, trained_fraction: float
) -> None:
    if quantization not in (None, "nf4"):
        raise MemoryEstimateError(f"quantization must be None or 'nf4', got '{quantization}'")
    if device not in ("cuda", "cpu"):
        raise MemoryEstimateError(f"device must be 'cuda' or 'cpu', got '{device}'")
    if min(batch_size, seq_len, rank) < 1 or not 0 < trained_fraction <= 1:
        raise MemoryEstimateError("batch_size, seq_len and rank must be >= 1 and trained_fraction in (0, 1]")


def _weight_bytes(quantization: str | None, params: dict, layers: int, shapes: dict, dtype: str) -> tuple[float, int]:
    """(bytes of the base weights, bytes per element of the stored non-4-bit tensors)."""
    if quantization == "nf4":  # prepare_model_for_kbit_training casts every non-4-bit tensor to fp32
        non_quantized = params["embedding"] + params["head"] + params["other"]
        weights = layers * sum(nf4_bytes(i * o) for i, o in shapes.values()) + 4 * non_quantized
        return weights, 4  # embeddings, norms and head are fp32: the residual stream is fp32
    return params["total"] * DTYPE_BYTES[dtype], DTYPE_BYTES[dtype]


def _weight_copy_bytes(
    quantization: str | None,
    stored_bytes: int,
    c: int,
    linear_params: int,
    head_params: int,
    layers: int,
    gradient_checkpointing: bool,
) -> int:
    """autocast multiplies fp32 weights through a compute-dtype copy that backward needs: decoder
    linears when the base is stored in fp32, and the LM head whenever it is not in compute dtype."""
    linear_copy = 0 if quantization == "nf4" or stored_bytes == c else c * linear_params
    if gradient_checkpointing:
        linear_copy //= layers
    head_copy = 0 if stored_bytes == c else c * head_params
    return linear_copy + head_copy


def _overhead_bytes(device: str, kept_for_backward: float) -> tuple[int, float, str]:
    """(fixed runtime bytes, allocator allowance, the note saying how they were counted)."""
    if device == "cuda":
        note = (
            f"CUDA context {CUDA_CONTEXT_BYTES // MIB} MiB + {CUDA_ALLOCATOR_FRACTION:.0%} of activations, weight "
            "copies and logits for caching-allocator slack"
        )
        return CUDA_CONTEXT_BYTES, CUDA_ALLOCATOR_FRACTION * kept_for_backward, note
    note = (
        f"libraries + tokenizer {CPU_RUNTIME_BYTES // MIB} MiB + {CPU_ALLOCATOR_FRACTION:.0%} of activations, "
        "weight copies and logits for glibc malloc retention"
    )
    return CPU_RUNTIME_BYTES, CPU_ALLOCATOR_FRACTION * kept_for_backward, note


def _largest_fitting(fits, low: int, high: int) -> int:
    """Largest n in [low, high] with fits(n) true (fits is monotone: true, then false); low - 1 if none."""
    if not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def recommend_setup(
    config,
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    batch_size: int = 4,
    seq_len: int = 1024,
    rank: int = 16,
    target_modules: list[str] | str = "q_proj,k_proj,v_proj",
    *,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    error_band: float = ESTIMATE_ERROR_BAND,
    trained_fraction: float = DEFAULT_TRAINED_FRACTION,
    lora_dtype: str = "fp16",
    compute_dtype: str = "fp16",
    lora_dropout: float = 0.05,
    device: str = "cuda",
) -> dict:
    """Choose LoRA or QLoRA, gradient checkpointing, micro-batch and accumulation for a memory budget.

    An option fits only when its estimate x (1 + `error_band`) fits the usable memory (the budget
    minus `safety_margin`): the estimator's own measured error counts against it. Rule, in order:
    1. LoRA (`lora_dtype` base: no quantization error, faster steps) when it fits the asked
       micro-batch (`batch_size`), or at least a micro-batch of 2;
    2. QLoRA when LoRA fits only micro-batch 1 (or nothing) and QLoRA fits a larger micro-batch:
       a micro-batch of 1 right at the margin trains in many small, slow micro-steps and is the
       first to run out of memory on a long example, where QLoRA keeps the asked batch with room;
    3. LoRA at micro-batch 1 when QLoRA does no better.
    Within a method: no checkpointing if the full batch fits, else checkpointing if it does, else the
    setting that fits the larger micro-batch. The micro-batch is the largest divisor of `batch_size`
    that fits, and gradient accumulation (batch_size / micro_batch) keeps the effective batch. When
    not even one sequence of `seq_len` fits: QLoRA + checkpointing at batch 1 and the longest
    sequence that fits.

    Args:
        config: transformers config of the base model.
        gpu_memory_gb: device memory in GiB (16 for a T4).
        batch_size: the effective batch (sequences per optimizer step) to keep.
        seq_len: padded sequence length of a micro-batch.
        rank: LoRA rank.
        target_modules: module names, comma-separated string or "all-linear".
        safety_margin: fraction of the budget kept free (fragmentation spikes, other processes).
        error_band: relative error of the estimate itself (`ESTIMATE_ERROR_BAND`).
        trained_fraction: share of tokens with a label.
        lora_dtype: stored dtype of the base for LoRA ("fp16" on a T4).
        compute_dtype: autocast dtype (fp16 on a T4, bf16 on Ampere and newer).
        lora_dropout: adapter dropout.
        device: "cuda" (a GPU budget) or "cpu" (a RAM budget).

    Returns:
        {"method": "lora"|"qlora"|"none", "quantization", "gradient_checkpointing", "micro_batch_size",
         "gradient_accumulation_steps", "effective_batch_size", "seq_len", "max_micro_batch_size",
         "max_seq_len", "estimated_gb", "estimated_with_band_gb", "headroom_gb", "error_band",
         "budget_gb", "usable_gb", "safety_margin", "fits", "reason", "candidates": [...]}

    Raises:
        MemoryEstimateError: bad settings (see `estimate_memory`), or a margin or band outside [0, 1).
    """
    if not 0 <= safety_margin < 1 or not 0 <= error_band < 1:
        raise MemoryEstimateError(f"safety margin and error band must be in [0, 1), got {safety_margin}, {error_band}")
    usable = gpu_memory_gb * GIB * (1 - safety_margin)
    # total(method, checkpointing, batch, length) -> bytes; fits(...) -> estimate + error band <= usable
    total = functools.partial(
        _setup_bytes,
        config=config,
        rank=rank,
        target_modules=target_modules,
        trained_fraction=trained_fraction,
        lora_dtype=lora_dtype,
        compute_dtype=compute_dtype,
        lora_dropout=lora_dropout,
        device=device,
    )
    fits = functools.partial(_fits_budget, total, usable, error_band)
    candidates = _setup_candidates(total, fits, batch_size, seq_len)
    choice = _choose_setting(config, candidates, total, fits, batch_size, seq_len, lora_dtype, error_band, usable)
    return _build_recommendation(
        choice, candidates, total, fits, batch_size, seq_len, gpu_memory_gb, usable, safety_margin, error_band
    )


def _choose_setting(
    config,
    candidates: list[dict],
    total: Callable[..., int],
    fits: Callable[..., bool],
    batch_size: int,
    seq_len: int,
    lora_dtype: str,
    error_band: float,
    usable: float,
) -> dict:
    """The method choice of `recommend_setup` (rules 1-3, or a shorter sequence), with its micro-batch.

    Args:
        config: transformers config of the base model (its max_position_embeddings bounds `max_seq_len`).
        candidates: `_setup_candidates`'s four settings (LoRA and QLoRA, without and with checkpointing).
        total: (method, gc, batch, seq) -> estimated bytes.
        fits: (method, gc, batch, seq) -> whether the estimate plus the error band fits `usable`.
        batch_size: the effective batch to keep.
        seq_len: the asked sequence length.
        lora_dtype: stored dtype of the base for LoRA (named in the reason).
        error_band: relative error of the estimate (named in the reason).
        usable: usable bytes (budget minus the safety margin).

    Returns:
        {"method": "lora"|"qlora"|"none", "gradient_checkpointing", "micro_batch_size", "seq_len" (the
         length it trains at), "max_seq_len", "reason", "why_not_lora" ("" unless QLoRA beat LoRA)}
    """
    lora, qlora = (_best_setting([c for c in candidates if c["method"] == m]) for m in ("lora", "qlora"))
    lora_batch = lora["max_micro_batch_size"] if lora else 0
    why_not_lora = ""
    if lora and (lora["fits"] or lora_batch >= 2):
        chosen = lora
    elif qlora and qlora["max_micro_batch_size"] > lora_batch:
        chosen = qlora
        why_not_lora = _why_not_lora(lora, total, batch_size, seq_len, lora_dtype, error_band, usable)
    else:
        chosen = lora
    if chosen is None:  # not even one sequence: QLoRA + checkpointing at a shorter length
        method, gc, micro_batch, max_seq, reason = _shorter_sequence_setup(fits, seq_len, usable)
        usable_seq = max_seq
    else:
        max_positions = describe_architecture(config)["max_positions"] or 131072
        method, gc, micro_batch, max_seq = _fit_chosen(chosen, fits, batch_size, seq_len, max_positions)
        usable_seq = seq_len
        label = f"LoRA on the {lora_dtype} base" if method == "lora" else "QLoRA"
        reason = (
            f"{why_not_lora}{label} {'with' if gc else 'without'} gradient checkpointing fits micro-batch "
            f"{micro_batch} x {seq_len} tokens"
        )
    return {
        "method": method,
        "gradient_checkpointing": gc,
        "micro_batch_size": micro_batch,
        "seq_len": usable_seq,
        "max_seq_len": max_seq,
        "reason": reason,
        "why_not_lora": why_not_lora,
    }


def _build_recommendation(
    choice: dict,
    candidates: list[dict],
    total: Callable[..., int],
    fits: Callable[..., bool],
    batch_size: int,
    seq_len: int,
    gpu_memory_gb: float,
    usable: float,
    safety_margin: float,
    error_band: float,
) -> dict:
    """`recommend_setup`'s result for the chosen setting: its estimate, headroom, accumulation and
    the largest micro-batch it fits.

    Args:
        choice: `_choose_setting`'s result.
        candidates, total, fits, batch_size, seq_len: as for `_choose_setting`.
        gpu_memory_gb: the budget in GiB.
        usable: usable bytes (budget minus the safety margin).
        safety_margin: fraction of the budget kept free.
        error_band: relative error of the estimate.

    Returns:
        The dict `recommend_setup` documents.
    """
    method, gc, micro_batch = choice["method"], choice["gradient_checkpointing"], choice["micro_batch_size"]
    usable_seq, reason = choice["seq_len"], choice["reason"]
    estimated = total(method if method != "none" else "qlora", gc, max(micro_batch, 1), max(usable_seq, 16))
    max_micro = next(
        (c["max_micro_batch_size"] for c in candidates if c["method"] == method and c["gradient_checkpointing"] == gc),
        0,
    )
    if method != "none" and max_micro >= batch_size:  # how far the batch could grow at this length
        max_micro = _largest_fitting(
            functools.partial(_fits_batch, fits, method, gc, seq_len), batch_size, 64 * batch_size
        )
    headroom = usable - estimated * (1 + error_band)
    if choice["why_not_lora"]:
        reason += f", with {headroom / GIB:.1f} GiB to spare"
    accumulation = batch_size // micro_batch if micro_batch else 0
    return {
        "method": method,
        "quantization": "nf4" if method == "qlora" else None,
        "gradient_checkpointing": gc,
        "micro_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": micro_batch * accumulation,
        "seq_len": usable_seq,
        "max_micro_batch_size": max_micro,
        "max_seq_len": choice["max_seq_len"],
        "estimated_gb": estimated / GIB,
        "estimated_with_band_gb": estimated * (1 + error_band) / GIB,
        "headroom_gb": headroom / GIB,
        "error_band": error_band,
        "budget_gb": gpu_memory_gb,
        "usable_gb": usable / GIB,
        "safety_margin": safety_margin,
        "fits": method != "none" and usable_seq == seq_len,
        "reason": reason,
        "candidates": candidates,
    }


def _setup_bytes(
    method: str,
    gc: bool,
    batch: int,
    seq: int,
    *,
    config,
    rank: int,
    target_modules: list[str] | str,
    trained_fraction: float,
    lora_dtype: str,
    compute_dtype: str,
    lora_dropout: float,
    device: str,
) -> int:
    """Estimated bytes of LoRA (on the `lora_dtype` base) or QLoRA at one checkpointing/batch/length."""
    quantization, dtype = (None, lora_dtype) if method == "lora" else ("nf4", compute_dtype)
    return estimate_memory(
        config,
        batch,
        seq,
        rank,
        target_modules,
        quantization,
        dtype,
        gc,
        trained_fraction,
        device=device,
        compute_dtype=compute_dtype,
        lora_dropout=lora_dropout,
    )["total"]


def _fits_budget(total, usable: float, error_band: float, method: str, gc: bool, batch: int, seq: int) -> bool:
    return total(method, gc, batch, seq) * (1 + error_band) <= usable


def _fits_batch(fits, method: str, gc: bool, seq: int, batch: int) -> bool:
    return fits(method, gc, batch, seq)


def _fits_length(fits, method: str, gc: bool, batch: int, seq: int) -> bool:
    return fits(method, gc, batch, seq)


def _setup_candidates(total, fits, batch_size: int, seq_len: int) -> list[dict]:
    """LoRA and QLoRA, each without and with checkpointing: the estimate and the largest micro-batch that fits."""
    candidates = []
    for method in ("lora", "qlora"):
        for gc in (False, True):
            max_batch = _largest_fitting(functools.partial(_fits_batch, fits, method, gc, seq_len), 1, batch_size)
            candidates.append(
                {
                    "method": method,
                    "gradient_checkpointing": gc,
                    "estimated_gb": total(method, gc, batch_size, seq_len) / GIB,
                    "fits": max_batch >= batch_size,
                    "max_micro_batch_size": max(max_batch, 0),
                }
            )
    return candidates


def _best_setting(candidates: list[dict]) -> dict | None:
    """A method's better setting: no checkpointing if the full batch fits, else checkpointing if it does,
    else the one fitting the larger micro-batch; None when not even one sequence fits."""
    no_gc, gc = candidates
    if no_gc["fits"] or gc["fits"]:
        return no_gc if no_gc["fits"] else gc
    if max(no_gc["max_micro_batch_size"], gc["max_micro_batch_size"]) >= 1:
        return gc if gc["max_micro_batch_size"] > no_gc["max_micro_batch_size"] else no_gc
    return None


def _why_not_lora(lora, total, batch_size: int, seq_len: int, lora_dtype: str, error_band: float, usable: float) -> str:
    """The start of the reason when QLoRA is chosen over a LoRA that fits only micro-batch 1 (or nothing)."""
    if not lora:
        return f"LoRA does not fit one sequence of {seq_len} tokens with the {error_band:.0%} estimate error, so "
    setting = "with" if lora["gradient_checkpointing"] else "without"
    lora_gb = total("lora", lora["gradient_checkpointing"], 1, seq_len) / GIB
    return (
        f"LoRA on the {lora_dtype} base fits only micro-batch 1 of {batch_size} ({setting} checkpointing: "
        f"{lora_gb:.1f} GiB + {error_band:.0%} estimate error = {lora_gb * (1 + error_band):.1f} of "
        f"{usable / GIB:.1f} GiB usable), so "
    )


def _fit_chosen(chosen: dict, fits, batch_size: int, seq_len: int, max_positions: int) -> tuple[str, bool, int, int]:
    """The chosen setting's micro-batch (the largest divisor of the batch that fits, so accumulation
    keeps the effective batch exactly) and the longest sequence it fits: (method, gc, micro-batch, max length)."""
    method, gc, micro_batch = chosen["method"], chosen["gradient_checkpointing"], chosen["max_micro_batch_size"]
    micro_batch = max(d for d in range(1, min(micro_batch, batch_size) + 1) if batch_size % d == 0)
    max_seq = _largest_fitting(functools.partial(_fits_length, fits, method, gc, micro_batch), seq_len, max_positions)
    return method, gc, micro_batch, max_seq


def _shorter_sequence_setup(fits, seq_len: int, usable: float) -> tuple[str, bool, int, int, str]:
    """When no method fits one sequence: QLoRA + checkpointing at batch 1 and the longest length that fits.

    Returns:
        (method, gradient checkpointing, micro-batch, max sequence length, reason); method "none" when
        even the 4-bit weights do not fit.
    """
    max_seq = _largest_fitting(functools.partial(_fits_length, fits, "qlora", True, 1), 16, seq_len)
    reason = f"no method fits one sequence of {seq_len} tokens in {usable / GIB:.1f} GiB"
    if max_seq >= 16:
        return "qlora", True, 1, max_seq, reason + f"; QLoRA with checkpointing fits sequences up to {max_seq} tokens"
    return "none", True, 0, 0, reason + "; even the 4-bit weights do not fit: use a larger GPU or a smaller model"


def device_memory_bytes(device: str) -> int:
    """Memory a training process on `device` can use: the GPU's total memory, or available RAM on CPU."""
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    import psutil

    return psutil.virtual_memory().available


def check_fits(
    config,
    device: str,
    batch_size: int,
    seq_len: int,
    rank: int,
    target_modules: list[str] | str,
    quantization: str | None,
    dtype: str | torch.dtype,
    gradient_checkpointing: bool,
    *,
    compute_dtype: str | torch.dtype | None = None,
    lora_dropout: float = 0.05,
    trained_fraction: float = DEFAULT_TRAINED_FRACTION,
    budget_bytes: int | None = None,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    error_band: float = ESTIMATE_ERROR_BAND,
) -> tuple[bool, str]:
    """Pre-flight check for train.py: does this configuration fit the device?

    Args:
        config: the base model's config (`model.config` or `common.model.load_config(name)`).
        device: "cuda" or "cpu" (`accelerator.device.type`); other devices are not estimated.
        batch_size, seq_len, rank, target_modules, quantization, dtype, gradient_checkpointing,
        compute_dtype, lora_dropout, trained_fraction: as for `estimate_memory`; pass what train.py
            actually uses (`dtype` is the dtype given to `load_model_and_tokenizer`).
        budget_bytes: memory available; default `device_memory_bytes(device)`.
        safety_margin: fraction of the budget kept free.
        error_band: the estimate's own relative error; it fits when estimate x (1 + band) fits.

    Returns:
        (fits, one-line message with the estimate, the budget and, when it does not fit, what to change).
        (True, "...skipped...") for a device other than cuda/cpu.

    Raises:
        MemoryEstimateError: the config or the settings cannot be estimated.
    """
    if device not in ("cuda", "cpu"):
        return True, f"memory estimate skipped: no model of {device} memory"
    estimate = estimate_memory(
        config,
        batch_size,
        seq_len,
        rank,
        target_modules,
        quantization,
        dtype,
        gradient_checkpointing,
        trained_fraction,
        device=device,
        compute_dtype=compute_dtype,
        lora_dropout=lora_dropout,
    )
    budget = budget_bytes if budget_bytes is not None else device_memory_bytes(device)
    usable = budget * (1 - safety_margin)
    fits = estimate["total"] * (1 + error_band) <= usable
    message = (
        f"memory estimate {estimate['total'] / GIB:.2f} GiB (+{error_band:.0%} estimate error "
        f"{estimate['total'] * (1 + error_band) / GIB:.2f}) for batch {batch_size} x {seq_len} tokens "
        f"({'QLoRA' if quantization else 'LoRA'}, checkpointing {'on' if gradient_checkpointing else 'off'}) "
        f"vs {usable / GIB:.2f} GiB usable on {device} ({budget / GIB:.1f} GiB, {safety_margin:.0%} margin)"
    )
    if not fits:
        remedies = ["lower --batch-size (more accumulation keeps the effective batch)", "--max-seq-len"]
        remedies += [] if gradient_checkpointing else ["--gradient-checkpointing"]
        remedies += [] if quantization else ["--quantization nf4"]
        message += f"; try {', '.join(remedies)} (see `python profile_memory.py`)"
    return fits, message


# --- measurement: a few real training steps in a fresh process ---


def _peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def build_random_batch(
    vocab_size: int, batch_size: int, seq_len: int, trained_fraction: float, pad_tokens: int = 8, seed: int = 0
) -> dict:
    """A right-padded batch of random tokens shaped like a training batch.

    Args:
        vocab_size: token ids are drawn from [0, vocab_size).
        batch_size, seq_len: batch shape.
        trained_fraction: the last `trained_fraction` of every row carries labels (the "assistant reply").
        pad_tokens: padding at the end of the last row, so that the model gets a padding mask as in a
            batch of unequal lengths (0 = no padding).
        seed: generator seed.

    Returns:
        {"input_ids", "attention_mask", "labels"}, labels -100 on untrained and padding positions.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_tokens:
        attention_mask[-1, seq_len - pad_tokens :] = 0
    labels = input_ids.clone()
    labels[:, : seq_len - round(seq_len * trained_fraction)] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _load_lora_model(
    model: str,
    quantization: str | None,
    dtype: torch.dtype,
    on_cuda: bool,
    rank: int,
    target_modules: list[str] | str,
    lora_dropout: float,
    gradient_checkpointing: bool,
):
    """The base as train.py loads it, with LoRA (alpha 2 x rank) applied, in train mode; and its tokenizer."""
    from common.lora import apply_lora, parse_target_modules
    from common.model import load_model_and_tokenizer

    base, tokenizer = load_model_and_tokenizer(
        model,
        quantization=quantization,
        dtype=dtype,
        device_map={"": torch.cuda.current_device()} if on_cuda and quantization else None,
    )
    if on_cuda and not quantization:
        base.to("cuda")
    peft_model = apply_lora(
        base,
        rank=rank,
        alpha=2 * rank,
        dropout=lora_dropout,
        target_modules=parse_target_modules(target_modules) if isinstance(target_modules, str) else target_modules,
        quantized=quantization is not None,
        gradient_checkpointing=gradient_checkpointing,
    )
    peft_model.train()
    return peft_model, tokenizer


def _run_steps(loss_model, trainable: list, optimizer, scaler, batch: dict, autocast: dict, steps: int):
    """`steps` training steps on one batch (torch.autocast(**autocast), backward, clip, AdamW).

    Returns:
        (seconds per step, loss per step).
    """
    import time

    step_times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(**autocast):
            row_losses, row_counts = loss_model(**batch)  # per row (or already summed): sum either way
            loss = row_losses.sum() / row_counts.sum()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync: the step is finished before the clock stops
        step_times.append(time.perf_counter() - start)
    return step_times, losses


def measure_training_memory(
    model: str,
    quantization: str | None,
    batch_size: int,
    seq_len: int,
    rank: int,
    target_modules: list[str] | str,
    gradient_checkpointing: bool,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    compute_dtype: str | None = None,
    lora_dropout: float = 0.05,
    trained_fraction: float = DEFAULT_TRAINED_FRACTION,
    steps: int = 2,
    baseline_bytes: int = 0,
) -> dict:
    """Run `steps` training steps as train.py does and return the peak memory of the steps.

    Same computation as train.py: `load_model_and_tokenizer` -> `apply_lora` -> `TrainedTokenLoss`,
    autocast (bf16 on CPU, fp16 + GradScaler on a GPU without bf16), backward, clipping, AdamW on
    the adapters. Call it in a fresh process (`measure_in_subprocess`): earlier allocations in the
    same process would hide in the peak.

    Args:
        model: alias, folder or hub id.
        quantization, batch_size, seq_len, rank, target_modules, gradient_checkpointing, lora_dropout,
            trained_fraction: as for `estimate_memory`.
        device: "cpu" or "cuda".
        dtype: dtype of the loaded base ("fp32" default for LoRA on CPU, "fp16" on CUDA; for "nf4" the
            compute dtype, default `compute_dtype`).
        compute_dtype: autocast dtype (default bf16 on CPU and bf16-capable GPUs, else fp16).
        steps: training steps (the peak is reached from step 2 on, when AdamW states exist).
        baseline_bytes: peak RSS of the bare process before loading (subtracted on CPU).

    Returns:
        {"device", "peak_bytes", "measured_bytes" (CPU: peak RSS of the steps minus baseline; CUDA:
         max reserved), "baseline_bytes", "load_peak_bytes", "peak_reset", "max_allocated_bytes",
         "max_reserved_bytes", "tokens", "trained_tokens", "step_times_s", "losses", "dtype", "compute_dtype"}
    """
    from common.loss import TrainedTokenLoss

    torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    on_cuda = device == "cuda"
    if compute_dtype is None:  # common.precision's GPU rule: bf16 from compute capability 8.0 (a T4 is 7.5)
        compute_dtype = "bf16" if not on_cuda or torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    if dtype is None:
        dtype = compute_dtype if quantization else ("fp16" if on_cuda else "fp32")
    peft_model, tokenizer = _load_lora_model(
        model, quantization, torch_dtypes[dtype], on_cuda, rank, target_modules, lora_dropout, gradient_checkpointing
    )
    loss_model = TrainedTokenLoss(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    # fp16 needs loss scaling on either device (on a CPU, too: torch.amp.GradScaler("cpu"), as train.py)
    scaler = torch.amp.GradScaler(device) if compute_dtype == "fp16" else None
    batch = build_random_batch(len(tokenizer), batch_size, seq_len, trained_fraction)
    batch = {key: value.to(device) for key, value in batch.items()}

    load_peak = _peak_rss_bytes()
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        peak_reset = True
    else:
        peak_reset = _reset_peak_rss()
    autocast = {"device_type": device, "dtype": torch_dtypes[compute_dtype], "enabled": compute_dtype != "fp32"}
    step_times, losses = _run_steps(loss_model, trainable, optimizer, scaler, batch, autocast, steps)

    result = {
        "device": device,
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "baseline_bytes": baseline_bytes,
        "load_peak_bytes": load_peak,
        "peak_reset": peak_reset,
        "tokens": int(batch["attention_mask"].sum()),
        "trained_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "step_times_s": step_times,
        "losses": losses,
    }
    if on_cuda:
        result["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["peak_bytes"] = result["measured_bytes"] = result["max_reserved_bytes"]
    else:
        result["peak_bytes"] = _peak_rss_bytes()
        result["measured_bytes"] = result["peak_bytes"] - baseline_bytes
    return result


# The child records its peak RSS right after `import torch, transformers`: that baseline is what
# any training script pays before touching a model, and it is subtracted from the step peak.
_WORKER = """
import json, sys
import torch, transformers
from common.memory import _peak_rss_bytes, measure_training_memory
baseline = _peak_rss_bytes()
print(json.dumps(measure_training_memory(**json.loads(sys.argv[1]), baseline_bytes=baseline)))
"""


def measure_in_subprocess(timeout_s: float = 900, extra_env: dict | None = None, **kwargs) -> dict:
    """Run `measure_training_memory(**kwargs)` in a fresh Python process and return its result.

    Args:
        timeout_s: give up after this many seconds.
        extra_env: environment variables for the child (e.g. {"MALLOC_MMAP_THRESHOLD_": "131072"}
            makes glibc return freed buffers at once, so the peak RSS is the live-tensor peak).
        **kwargs: arguments of `measure_training_memory` (JSON-serializable).

    Returns:
        The measurement dict.

    Raises:
        RuntimeError: the child failed; the message holds the end of its stderr.
    """
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, json.dumps(kwargs)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_to_measurement(estimate: dict, measurement: dict) -> dict:
    """Put an estimate next to a measurement of the same settings.

    On CUDA the measurement is the allocator's peak reserved memory, which excludes the CUDA
    context, so the context allowance is taken out of the estimate first. On CPU both include
    everything above the bare `import torch, transformers` process.

    Returns:
        {"estimated_bytes", "measured_bytes", "ratio" (estimated / measured)}
    """
    estimated = estimate["total"] - (CUDA_CONTEXT_BYTES if measurement["device"] == "cuda" else 0)
    return {
        "estimated_bytes": estimated,
        "measured_bytes": measurement["measured_bytes"],
        "ratio": estimated / max(measurement["measured_bytes"], 1),
    }
