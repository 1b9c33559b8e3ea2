"""train.py's memory pre-flight: a quick estimate of one training step's peak, against the device.

    fits, message = check_fits(model.config, Setup(4, 512, 16, ["q_proj", "v_proj"], dtype="bf16", device="cpu"))

`quick_estimate_bytes` counts the large terms of `common.memory_estimator.estimate_memory` (which
explains each; `python profile_memory.py` prints them and picks LoRA or QLoRA) and leaves out the
small ones: 0-1% under it on the default model (tests/test_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from common.lora import parse_target_modules

MIB, GIB = 2**20, 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# NF4 + double quantization (QLoRA): 4-bit codes, a uint8 absmax per 64 weights, an fp32 absmax per 256 of those
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE = 64, 256
NF4_BITS_PER_PARAM = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)
# Stated allowances, fixed + a share of what backward keeps (memory_estimator.py says where they come from)
CUDA_CONTEXT_BYTES, CUDA_ALLOCATOR_FRACTION = 512 * MIB, 0.10
CPU_RUNTIME_BYTES, CPU_ALLOCATOR_FRACTION = 224 * MIB, 0.50
# The estimator's measured error: estimated / measured within [1 / 1.2, 1.2] in every CPU run of
# memory_profile_cpu.md's table 1 (no GPU band yet). Fits when estimate x (1 + band) fits the budget minus the margin.
ESTIMATE_ERROR_BAND, DEFAULT_SAFETY_MARGIN = 0.20, 0.10


class MemoryEstimateError(ValueError):
    """The config or the settings cannot be estimated; the message says what to change."""


@dataclass
class Setup:
    """One training configuration to estimate (dtypes: "fp32"/"fp16"/"bf16" or torch dtypes)."""

    batch_size: int
    seq_len: int  # padded tokens per row (right-padded batches: attention gets a padding mask)
    rank: int
    target_modules: list[str] | str  # names, "q_proj,v_proj" or "all-linear"
    quantization: str | None = None  # None (LoRA) or "nf4" (QLoRA)
    dtype: str | torch.dtype = "fp16"  # as given to load_model_and_tokenizer: LoRA's base, QLoRA's compute
    gradient_checkpointing: bool = False
    device: str = "cuda"  # "cuda" or "cpu"
    compute_dtype: str | torch.dtype | None = None  # autocast; None: dtype if 16-bit, else bf16 CPU, fp16 CUDA
    lora_dropout: float = 0.05  # > 0 keeps a dropout mask of each adapter input
    trained_fraction: float = 0.5  # share of tokens with a label: the LM head runs only there

    def dtype_names(self) -> tuple[str, str]:
        """(dtype, compute dtype) as "fp32"/"fp16"/"bf16"."""
        dtype, compute = (DTYPE_NAMES.get(d, d) for d in (self.dtype, self.compute_dtype))
        compute = compute or (dtype if dtype != "fp32" else "bf16" if self.device == "cpu" else "fp16")
        for name in (dtype, compute):
            if name not in DTYPE_BYTES:
                raise MemoryEstimateError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got '{name}'")
        return dtype, compute


def target_names(target_modules: list[str] | str) -> list[str]:
    """The decoder linears LoRA targets, in layer order, from a list or `--target-modules` text.

    Raises:
        MemoryEstimateError: a name is not a linear layer of a Llama-style decoder.
    """
    names = parse_target_modules(target_modules) if isinstance(target_modules, str) else target_modules
    names = LINEAR_MODULES if names == "all-linear" else names
    unknown = [name for name in names if name not in LINEAR_MODULES]
    if unknown or not names:
        raise MemoryEstimateError(
            f"target modules {unknown or names} unknown; use names from {', '.join(LINEAR_MODULES)} or all-linear"
        )
    return [name for name in LINEAR_MODULES if name in names]


def describe_architecture(config) -> dict:
    """The sizes the estimates need, from the config of a Llama-style decoder (llama, mistral, qwen2, qwen3).

    Raises:
        MemoryEstimateError: the config lacks one of them.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    model_type, missing = getattr(text, "model_type", ""), [f for f in fields if getattr(text, f, None) is None]
    if missing:
        raise MemoryEstimateError(
            f"config of model_type '{model_type or '?'}' has no {', '.join(missing)}; "
            "the estimator supports Llama-style decoders (llama, mistral, qwen2, qwen3)"
        )
    heads, bias = text.num_attention_heads, bool(getattr(text, "attention_bias", False))
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
        "qkv_bias": model_type == "qwen2" or bias,  # Qwen2 always has q/k/v biases
        "o_bias": bias and model_type != "qwen2",
        "qk_norm": model_type == "qwen3",
        "max_positions": getattr(text, "max_position_embeddings", None),
        "attention": getattr(text, "_attn_implementation", None) or "sdpa",
    }


def linear_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one decoder layer."""
    hidden, inter = arch["hidden"], arch["intermediate"]
    q, kv = arch["heads"] * arch["head_dim"], arch["kv_heads"] * arch["head_dim"]
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    return dict(zip(LINEAR_MODULES, shapes))


def quick_estimate_bytes(config, setup: Setup) -> int:
    """Peak bytes of one training step of `setup`: the full estimate's large terms (module docstring)."""
    arch, targets = describe_architecture(config), target_names(setup.target_modules)
    (dtype, compute), shapes = setup.dtype_names(), linear_shapes(arch)
    c, nf4, gc = DTYPE_BYTES[compute], setup.quantization == "nf4", setup.gradient_checkpointing
    layers, hidden, heads, vocab = arch["layers"], arch["hidden"], arch["heads"], arch["vocab"]
    b, s, head = setup.batch_size, setup.seq_len, vocab * hidden
    linear = layers * sum(i * o for i, o in shapes.values())
    # QLoRA: 4-bit decoder linears, the rest in fp32 (prepare_model_for_kbit_training upcasts it)
    stored = 4 if nf4 else DTYPE_BYTES[dtype]
    embeddings = head * (1 if arch["tied"] else 2)
    weights = linear * NF4_BITS_PER_PARAM / 8 + 4 * embeddings if nf4 else stored * (linear + embeddings)
    adapters = 16 * layers * setup.rank * sum(sum(shapes[name]) for name in targets)  # fp32 param, grad, AdamW m, v
    # saved for backward, per layer and token: fp32 inputs of 2 norms, q/k/v/output (k/v repeated to all heads under
    # the padding mask), 3 MLP intermediates (fp32 out of 4-bit linears), adapter inputs and dropout masks
    mask = 0 if setup.lora_dropout <= 0 else 1 if setup.device == "cuda" else 4  # CUDA bool, CPU fp32 noise
    per_token = 8 * hidden + 4 * c * heads * arch["head_dim"] + 3 * arch["intermediate"] * (stored if nf4 else c)
    per_token += sum((c + mask) * shapes[name][0] for name in targets)
    # ... and per row: SDPA's float copy of the mask; eager attention's fp32 probabilities and their copy
    layer = b * s * (per_token + c * s + ((4 + c) * heads * s if arch["attention"] == "eager" else 0))
    # checkpointing keeps each layer's input, and one layer is live again in its backward
    activations = layers * stored * b * s * hidden + layer if gc else layers * layer
    # autocast's compute-dtype copies of fp32 weights (LM head, LoRA's decoder linears), kept for backward
    copies = 0 if stored == c else c * (head + (0 if nf4 else linear // (layers if gc else 1)))
    logits = 12 * max(1, round(b * s * setup.trained_fraction)) * vocab  # fp32 log-probs, their grad, logits' grad
    kept = activations + copies + logits
    if setup.device == "cuda":
        return round(weights + adapters + kept + CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_FRACTION * kept)
    return round(weights + adapters + kept + CPU_RUNTIME_BYTES + CPU_ALLOCATOR_FRACTION * kept)


def check_fits(config, setup: Setup, budget_bytes: int | None = None) -> tuple[bool, str]:
    """train.py's pre-flight: does `setup` fit the device (default: the GPU's memory, or the RAM available)?

    Returns:
        (fits, one line: estimate, usable memory and, if it does not fit, what to change); (True, "... skipped")
        on a device other than cuda or cpu.
    """
    band, margin, device = ESTIMATE_ERROR_BAND, DEFAULT_SAFETY_MARGIN, setup.device
    if device not in ("cuda", "cpu"):
        return True, f"memory estimate skipped: no model of {device} memory"
    estimate = quick_estimate_bytes(config, setup)
    if budget_bytes is None:
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if device == "cuda" else 0
        budget_bytes = gpu or psutil.virtual_memory().available
    usable = budget_bytes * (1 - margin)
    fits = estimate * (1 + band) <= usable
    message = (
        f"memory estimate {estimate / GIB:.2f} GiB (+{band:.0%} estimate error {estimate * (1 + band) / GIB:.2f}) "
        f"for batch {setup.batch_size} x {setup.seq_len} tokens ({'QLoRA' if setup.quantization else 'LoRA'}, "
        f"checkpointing {'on' if setup.gradient_checkpointing else 'off'}) vs {usable / GIB:.2f} GiB usable on "
        f"{device} ({budget_bytes / GIB:.1f} GiB, {margin:.0%} margin)"
    )
    if not fits:
        remedies = ["lower --batch-size (more accumulation keeps the effective batch)", "--max-seq-len"]
        remedies += [] if setup.gradient_checkpointing else ["--gradient-checkpointing"]
        remedies += [] if setup.quantization else ["--quantization nf4"]
        message += f"; try {', '.join(remedies)} (see `python profile_memory.py`)"
    return fits, message
