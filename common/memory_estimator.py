"""Training-memory estimate per component, and the LoRA-vs-QLoRA recommendation (profile_memory.py).

    from common.memory import Setup
    from common.memory_estimator import estimate_memory, recommend_setup
    setup = Setup(batch_size=4, seq_len=1024, rank=16, target_modules="q_proj,v_proj", quantization="nf4",
                  gradient_checkpointing=True)
    estimate = estimate_memory(config, setup)
    estimate["total"], estimate["components"]          # bytes, and bytes per component
    decision = recommend_setup(config, setup, gpu_memory_gb=16)  # it picks quantization and checkpointing

The estimate is a pure function of the config (no weights) and the training settings. Every term
is counted from first principles for a Llama-style decoder (q/k/v/o attention, gated SiLU MLP,
RMSNorm) trained the way `train.py` trains it: frozen base, LoRA adapters in fp32, AdamW, autocast
in the compute dtype, the loss of `common.loss` (LM head only on trained positions), right-padded
batches. Peak memory is taken at the start of the backward pass, when every saved activation and
the loss buffers are alive at once:

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
    overhead              stated allowances (the constants in common.memory):
                          - GPU: the CUDA context and cuBLAS workspaces live outside PyTorch's allocator
                            (CUDA_CONTEXT_BYTES); the caching allocator keeps freed blocks and rounds
                            sizes, so reserved > allocated (CUDA_ALLOCATOR_FRACTION of what backward keeps).
                          - CPU: what the training process holds beyond `import torch, transformers`
                            besides tensors (model code, peft, bitsandbytes and the tokenizer: measured
                            ~225 MiB for the default model, CPU_RUNTIME_BYTES), and glibc malloc
                            retention: activation buffers freed in forward leave holes in the heap that
                            later, differently sized allocations cannot reuse, so peak RSS exceeds the
                            live-tensor peak by 0.24-0.95 x (activations + weight copies + logits) in our
                            runs (LoRA and QLoRA, with and without checkpointing, two lengths, mean 0.6;
                            it even varies run to run). CPU_ALLOCATOR_FRACTION = 0.5 is a round value in
                            that range, not a derived term. With MALLOC_MMAP_THRESHOLD_ fixed the gap
                            vanishes and the estimate without it is within +1..+6% of the peak. See
                            benchmarks/results/memory_profile_cpu.md.

`common.preflight.estimate_step_bytes` (train.py's pre-flight) counts the large terms of the same
list; `common.memory_measure` measures real training steps to compare with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from common.memory import DTYPE_BYTES, MemoryEstimateError, Setup, describe_architecture, linear_shapes, target_names
from common.preflight import (
    CPU_ALLOCATOR_FRACTION,
    CPU_RUNTIME_BYTES,
    CUDA_ALLOCATOR_FRACTION,
    CUDA_CONTEXT_BYTES,
    DEFAULT_SAFETY_MARGIN,
    ESTIMATE_ERROR_BAND,
    GIB,
    MIB,
    NF4_BITS_PER_PARAM,
    NF4_BLOCKSIZE,
    NF4_NESTED_BLOCKSIZE,
)

# per quantized matrix: 16-entry NF4 code, 256-entry fp32 code of the 8-bit absmax, fp32 offset
NF4_CONSTANT_BYTES_PER_MATRIX = (16 + 256 + 1) * 4
# Adapters train in fp32 whatever the base dtype (PEFT upcasts them): param, grad, AdamW m and v.
ADAPTER_BYTES = {"lora_params": 4, "lora_grads": 4, "optimizer_states": 8}
DEFAULT_GPU_MEMORY_GB = 16.0  # a T4


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


def _layer_activation_bytes(
    arch: dict, setup: Setup, targets: list[str], c: int, mlp_bytes: int, mask_bytes: int
) -> int:
    """Bytes one decoder layer saves for backward (frozen base, LoRA on `targets`, compute dtype of `c` bytes).

    Frozen linears save no input (only their weight); what is saved:
      2 RMSNorms    the fp32 input of the norm math (4 B x T x hidden) + 1/rms per token (4 B x T)
      attention     SDPA flash/memory-efficient kernels keep q, k, v, output (c B each) and the fp32
                    log-sum-exp per head, never the s x s matrix. With the padding mask transformers
                    repeats k/v to all heads (GQA only without a mask) and SDPA keeps a float copy of
                    the mask per layer (c B x b x s^2). Eager attention also keeps the probabilities:
                    fp32 softmax + its c-byte copy (b x heads x s^2 x (4 + c)).
      MLP           gate output (SiLU input), up output, SiLU output: 3 x T x intermediate x mlp_bytes
      LoRA module   the adapter input in compute dtype (c B x T x in), the dropout mask (`mask_bytes`
                    x T x in: fp32 noise on CPU, bool on CUDA, none without dropout) and A's output
                    (c B x T x r); plus the compute-dtype copies of A and B.
    """
    batch, seq, rank = setup.batch_size, setup.seq_len, setup.rank
    tokens = batch * seq
    hidden, heads, head_dim = arch["hidden"], arch["heads"], arch["head_dim"]
    q_dim = kv_dim = heads * head_dim  # k/v repeated to every head under the padding mask
    total = 2 * (4 * tokens * hidden + 4 * tokens)
    total += c * tokens * (2 * q_dim + 2 * kv_dim)  # q, k, v, attention output
    if arch["attention"] == "eager":
        total += (4 + c) * batch * heads * seq * seq
    else:
        total += 4 * tokens * heads  # log-sum-exp
    total += c * batch * seq * seq  # the padding mask
    total += 3 * tokens * arch["intermediate"] * mlp_bytes
    for name in targets:
        in_features, out_features = linear_shapes(arch)[name]
        total += (c + mask_bytes) * tokens * in_features + c * tokens * rank + c * rank * (in_features + out_features)
    return total


def estimate_memory(config, setup: Setup) -> dict:
    """Estimate the peak memory of one LoRA/QLoRA training step, per component, in bytes.

    Args:
        config: transformers config of the base model (no weights needed).
        setup: the training settings (see `common.memory.Setup`).

    Returns:
        {"components": {name: bytes}, "total": bytes, "details": {...counts and assumptions...}}

    Raises:
        MemoryEstimateError: unknown quantization, dtype, device or target module, or bad sizes.
    """
    _check_estimate_settings(setup)
    arch = describe_architecture(config)
    targets = target_names(setup.target_modules)
    dtype, compute_dtype = setup.dtype_names()
    c = DTYPE_BYTES[compute_dtype]
    params = count_architecture_parameters(arch)
    layers, hidden, vocab = arch["layers"], arch["hidden"], arch["vocab"]
    shapes = linear_shapes(arch)

    weights, stored_bytes = _weight_bytes(setup.quantization, params, layers, shapes, dtype)
    # 4-bit linears return their input dtype (fp32 here), so QLoRA's MLP intermediates are fp32.
    mlp_bytes = stored_bytes if setup.quantization == "nf4" else c

    lora_params = layers * sum(setup.rank * (shapes[name][0] + shapes[name][1]) for name in targets)
    # CUDA's fused dropout keeps a bool mask; CPU keeps the noise in the (fp32) adapter dtype
    mask_bytes = 0 if setup.lora_dropout <= 0 else 1 if setup.device == "cuda" else 4
    layer_bytes = _layer_activation_bytes(arch, setup, targets, c, mlp_bytes, mask_bytes)
    tokens = setup.batch_size * setup.seq_len
    final_norm = 4 * tokens * hidden + 4 * tokens
    # with checkpointing each layer keeps its input; one layer is live again during its backward
    gc = setup.gradient_checkpointing
    kept_layers = layers * stored_bytes * tokens * hidden + layer_bytes if gc else layers * layer_bytes
    activations = kept_layers + final_norm

    weight_copies = _weight_copy_bytes(
        setup.quantization, stored_bytes, c, params["linear"], vocab * hidden, layers, gc
    )
    trained_tokens = max(1, round(tokens * setup.trained_fraction))
    logits = 12 * trained_tokens * vocab
    kept_for_backward = activations + weight_copies + logits
    fixed, allocator, overhead_note = _overhead_bytes(setup.device, kept_for_backward)
    adapter = {name: per_param * lora_params for name, per_param in ADAPTER_BYTES.items()}
    components = {"weights": weights, **adapter, "activations": activations, "weight_copies": weight_copies}
    components |= {"logits": logits, "overhead": fixed + allocator}
    components = {name: round(value) for name, value in components.items()}
    settings = {name: getattr(setup, name) for name in ("batch_size", "seq_len", "rank")}
    settings |= {"target_modules": targets, "quantization": setup.quantization, "gradient_checkpointing": gc}
    settings |= {name: getattr(setup, name) for name in ("trained_fraction", "device", "lora_dropout")}
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
            "weight_dtype": "nf4" if setup.quantization == "nf4" else dtype,
            "compute_dtype": compute_dtype,
            "nf4_bits_per_param": NF4_BITS_PER_PARAM,
            "settings": settings | {"padded": True},
            "overhead": overhead_note,
            "allocator_allowance": round(allocator),
        },
    }


def _check_estimate_settings(setup: Setup) -> None:
    if setup.quantization not in (None, "nf4"):
        raise MemoryEstimateError(f"quantization must be None or 'nf4', got '{setup.quantization}'")
    if setup.device not in ("cuda", "cpu"):
        raise MemoryEstimateError(f"device must be 'cuda' or 'cpu', got '{setup.device}'")
    if min(setup.batch_size, setup.seq_len, setup.rank) < 1 or not 0 < setup.trained_fraction <= 1:
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


# --- the recommendation: LoRA or QLoRA, checkpointing, micro-batch for a memory budget ---


@dataclass
class _Budget:
    """What an option must fit, and the estimate of one option (method, checkpointing, batch, length)."""

    config: object
    setup: Setup  # the asked batch (the effective batch to keep), length and LoRA settings
    gpu_memory_gb: float
    safety_margin: float
    error_band: float

    @property
    def usable(self) -> float:
        """Bytes an option may use: the budget minus the safety margin."""
        return self.gpu_memory_gb * GIB * (1 - self.safety_margin)

    def total(self, method: str, gc: bool, batch: int, seq: int) -> int:
        """Estimated bytes of LoRA (on the setup's dtype) or QLoRA (in its compute dtype)."""
        compute, lora = self.setup.dtype_names()[1], method == "lora"
        option = replace(self.setup, batch_size=batch, seq_len=seq, gradient_checkpointing=gc, compute_dtype=compute)
        option.quantization, option.dtype = (None, self.setup.dtype) if lora else ("nf4", compute)
        return estimate_memory(self.config, option)["total"]

    def fits(self, method: str, gc: bool, batch: int, seq: int) -> bool:
        """The estimate plus the error band fits the usable memory."""
        return self.total(method, gc, batch, seq) * (1 + self.error_band) <= self.usable


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
    setup: Setup,
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
    safety_margin: float = DEFAULT_SAFETY_MARGIN,
    error_band: float = ESTIMATE_ERROR_BAND,
) -> dict:
    """Choose LoRA or QLoRA, gradient checkpointing, micro-batch and accumulation for a memory budget.

    An option fits only when its estimate x (1 + `error_band`) fits the usable memory (the budget
    minus `safety_margin`): the estimator's own measured error counts against it. Rule, in order:
    1. LoRA (`setup.dtype` base: no quantization error, faster steps) when it fits the asked
       micro-batch (`setup.batch_size`), or at least a micro-batch of 2;
    2. QLoRA when LoRA fits only micro-batch 1 (or nothing) and QLoRA fits a larger micro-batch:
       a micro-batch of 1 right at the margin trains in many small, slow micro-steps and is the
       first to run out of memory on a long example, where QLoRA keeps the asked batch with room;
    3. LoRA at micro-batch 1 when QLoRA does no better.
    Within a method: no checkpointing if the full batch fits, else checkpointing if it does, else the
    setting that fits the larger micro-batch. The micro-batch is the largest divisor of the batch
    that fits, and gradient accumulation (batch / micro-batch) keeps the effective batch. When
    not even one sequence of `setup.seq_len` fits: QLoRA + checkpointing at batch 1 and the longest
    sequence that fits.

    Args:
        config: transformers config of the base model.
        setup: the effective batch to keep (`batch_size`), the padded length, the LoRA settings, the
            device, LoRA's base dtype (`dtype`: "fp16" on a T4) and the autocast dtype (QLoRA's compute
            dtype); its `quantization` and `gradient_checkpointing` are what this chooses (ignored).
        gpu_memory_gb: device memory in GiB (16 for a T4; a RAM budget for device "cpu").
        safety_margin: fraction of the budget kept free (fragmentation spikes, other processes).
        error_band: relative error of the estimate itself (`ESTIMATE_ERROR_BAND`).

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
    budget = _Budget(config, setup, gpu_memory_gb, safety_margin, error_band)
    candidates = _setup_candidates(budget)
    choice = _choose_setting(budget, candidates)
    return _build_recommendation(budget, choice, candidates)


def _setup_candidates(budget: _Budget) -> list[dict]:
    """LoRA and QLoRA, each without and with checkpointing: the estimate and the largest micro-batch that fits."""
    batch_size, seq_len = budget.setup.batch_size, budget.setup.seq_len
    candidates = []
    for method in ("lora", "qlora"):
        for gc in (False, True):
            max_batch = _largest_fitting(lambda b, m=method, g=gc: budget.fits(m, g, b, seq_len), 1, batch_size)
            candidates.append(
                {
                    "method": method,
                    "gradient_checkpointing": gc,
                    "estimated_gb": budget.total(method, gc, batch_size, seq_len) / GIB,
                    "fits": max_batch >= batch_size,
                    "max_micro_batch_size": max(max_batch, 0),
                }
            )
    return candidates


def _choose_setting(budget: _Budget, candidates: list[dict]) -> dict:
    """The method choice of `recommend_setup` (rules 1-3, or a shorter sequence), with its micro-batch.

    Returns:
        {"method": "lora"|"qlora"|"none", "gradient_checkpointing", "micro_batch_size", "seq_len" (the
         length it trains at), "max_seq_len", "reason", "why_not_lora" ("" unless QLoRA beat LoRA)}
    """
    seq_len = budget.setup.seq_len
    lora, qlora = (_best_setting([c for c in candidates if c["method"] == m]) for m in ("lora", "qlora"))
    lora_batch = lora["max_micro_batch_size"] if lora else 0
    why_not_lora = ""
    if lora and (lora["fits"] or lora_batch >= 2):
        chosen = lora
    elif qlora and qlora["max_micro_batch_size"] > lora_batch:
        chosen = qlora
        why_not_lora = _why_not_lora(budget, lora)
    else:
        chosen = lora
    if chosen is None:  # not even one sequence: QLoRA + checkpointing at a shorter length
        method, gc, micro_batch, max_seq, reason = _shorter_sequence_setup(budget)
        usable_seq = max_seq
    else:
        max_positions = describe_architecture(budget.config)["max_positions"] or 131072
        method, gc, micro_batch, max_seq = _fit_chosen(budget, chosen, max_positions)
        usable_seq = seq_len
        label = f"LoRA on the {budget.setup.dtype_names()[0]} base" if method == "lora" else "QLoRA"
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


def _build_recommendation(budget: _Budget, choice: dict, candidates: list[dict]) -> dict:
    """`recommend_setup`'s result for the chosen setting: its estimate, headroom, accumulation and
    the largest micro-batch it fits."""
    batch_size, seq_len = budget.setup.batch_size, budget.setup.seq_len
    method, gc, micro_batch = choice["method"], choice["gradient_checkpointing"], choice["micro_batch_size"]
    usable_seq, reason = choice["seq_len"], choice["reason"]
    estimated = budget.total(method if method != "none" else "qlora", gc, max(micro_batch, 1), max(usable_seq, 16))
    max_micro = next(
        (c["max_micro_batch_size"] for c in candidates if c["method"] == method and c["gradient_checkpointing"] == gc),
        0,
    )
    if method != "none" and max_micro >= batch_size:  # how far the batch could grow at this length
        max_micro = _largest_fitting(lambda b: budget.fits(method, gc, b, seq_len), batch_size, 64 * batch_size)
    headroom = budget.usable - estimated * (1 + budget.error_band)
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
        "estimated_with_band_gb": estimated * (1 + budget.error_band) / GIB,
        "headroom_gb": headroom / GIB,
        "error_band": budget.error_band,
        "budget_gb": budget.gpu_memory_gb,
        "usable_gb": budget.usable / GIB,
        "safety_margin": budget.safety_margin,
        "fits": method != "none" and usable_seq == seq_len,
        "reason": reason,
        "candidates": candidates,
    }


def _best_setting(candidates: list[dict]) -> dict | None:
    """A method's better setting: no checkpointing if the full batch fits, else checkpointing if it does,
    else the one fitting the larger micro-batch; None when not even one sequence fits."""
    no_gc, gc = candidates
    if no_gc["fits"] or gc["fits"]:
        return no_gc if no_gc["fits"] else gc
    if max(no_gc["max_micro_batch_size"], gc["max_micro_batch_size"]) >= 1:
        return gc if gc["max_micro_batch_size"] > no_gc["max_micro_batch_size"] else no_gc
    return None


def _why_not_lora(budget: _Budget, lora: dict | None) -> str:
    """The start of the reason when QLoRA is chosen over a LoRA that fits only micro-batch 1 (or nothing)."""
    seq_len, band = budget.setup.seq_len, budget.error_band
    if not lora:
        return f"LoRA does not fit one sequence of {seq_len} tokens with the {band:.0%} estimate error, so "
    setting, lora_dtype = "with" if lora["gradient_checkpointing"] else "without", budget.setup.dtype_names()[0]
    lora_gb = budget.total("lora", lora["gradient_checkpointing"], 1, seq_len) / GIB
    return (
        f"LoRA on the {lora_dtype} base fits only micro-batch 1 of {budget.setup.batch_size} ({setting} "
        f"checkpointing: {lora_gb:.1f} GiB + {band:.0%} estimate error = {lora_gb * (1 + band):.1f} of "
        f"{budget.usable / GIB:.1f} GiB usable), so "
    )


def _fit_chosen(budget: _Budget, chosen: dict, max_positions: int) -> tuple[str, bool, int, int]:
    """The chosen setting's micro-batch (the largest divisor of the batch that fits, so accumulation
    keeps the effective batch exactly) and the longest sequence it fits: (method, gc, micro-batch, max length)."""
    batch_size, seq_len = budget.setup.batch_size, budget.setup.seq_len
    method, gc, micro_batch = chosen["method"], chosen["gradient_checkpointing"], chosen["max_micro_batch_size"]
    micro_batch = max(d for d in range(1, min(micro_batch, batch_size) + 1) if batch_size % d == 0)
    max_seq = _largest_fitting(lambda s: budget.fits(method, gc, micro_batch, s), seq_len, max_positions)
    return method, gc, micro_batch, max_seq


def _shorter_sequence_setup(budget: _Budget) -> tuple[str, bool, int, int, str]:
    """When no method fits one sequence: QLoRA + checkpointing at batch 1 and the longest length that fits.

    Returns:
        (method, gradient checkpointing, micro-batch, max sequence length, reason); method "none" when
        even the 4-bit weights do not fit.
    """
    seq_len = budget.setup.seq_len
    max_seq = _largest_fitting(lambda s: budget.fits("qlora", True, 1, s), 16, seq_len)
    reason = f"no method fits one sequence of {seq_len} tokens in {budget.usable / GIB:.1f} GiB"
    if max_seq >= 16:
        return "qlora", True, 1, max_seq, reason + f"; QLoRA with checkpointing fits sequences up to {max_seq} tokens"
    return "none", True, 0, 0, reason + "; even the 4-bit weights do not fit: use a larger GPU or a smaller model"
