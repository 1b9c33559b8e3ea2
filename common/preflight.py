"""train.py's memory pre-flight: one training step's peak bytes, read off the loaded PEFT model.

It counts the large terms of `common.memory_estimator.estimate_memory` (which explains each; `python
profile_memory.py` prints them and picks LoRA or QLoRA) with the weights as the model stores them:
0-1% under the full estimate on the default model (tests/test_memory.py).
"""

import itertools

import psutil
import torch

from common.perf import count_matmul_params

MIB, GIB = 2**20, 2**30
# NF4 + double quantization (QLoRA): 4-bit codes, a uint8 absmax per 64 weights, an fp32 absmax per 256 of those
NF4_BLOCKSIZE, NF4_NESTED_BLOCKSIZE = 64, 256
NF4_BITS_PER_PARAM = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)
# Stated allowances, fixed + a share of what backward keeps (memory_estimator.py says where they come from)
CUDA_CONTEXT_BYTES, CUDA_ALLOCATOR_FRACTION = 512 * MIB, 0.10
CPU_RUNTIME_BYTES, CPU_ALLOCATOR_FRACTION = 224 * MIB, 0.50
# The estimator's measured error: estimated / measured within [1 / 1.2, 1.2] in every CPU run of
# memory_profile_cpu.md's table 1 (no GPU band yet). Fits when estimate x (1 + band) fits the budget minus the margin.
ESTIMATE_ERROR_BAND, DEFAULT_SAFETY_MARGIN = 0.20, 0.10


def estimate_step_bytes(
    model: torch.nn.Module,
    batch_size: int,
    seq_len: int,
    compute_dtype: torch.dtype,
    device: str,
    gradient_checkpointing: bool,
    lora_dropout: float,
) -> int:
    """Peak bytes of one training step of the PEFT `model` on `batch_size` rows of `seq_len` padded tokens.

    Raises:
        ValueError: the config lacks a size of a Llama-style decoder (the pre-flight is then skipped).
    """
    base = model.get_base_model()
    text = base.config.get_text_config()
    fields = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    if missing := [f for f in fields if getattr(text, f, None) is None]:
        raise ValueError(f"config of model_type '{getattr(text, 'model_type', '?')}' has no {', '.join(missing)}")
    sizes = count_matmul_params(model)
    layers, hidden, heads, vocab = sizes["layers"], sizes["hidden"], text.num_attention_heads, text.vocab_size
    head_dim, inter = getattr(text, "head_dim", None) or hidden // heads, text.intermediate_size
    c, nf4 = torch.finfo(compute_dtype).bits // 8, any(type(m).__name__ == "Linear4bit" for m in base.modules())
    stored = base.get_input_embeddings().weight.element_size()  # QLoRA: prepare_model_for_kbit_training's fp32
    tensors = itertools.chain(model.parameters(), model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)  # 4-bit codes: 2 per byte
    weights += sizes["body"] * (NF4_BITS_PER_PARAM - 4) / 8 if nf4 else 0  # their absmax blocks
    adapters = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # fp32 grad, AdamW m, v
    # saved for backward, per layer and token: fp32 inputs of 2 norms, q/k/v/output (k/v repeated to all heads under
    # the padding mask), 3 MLP intermediates (fp32 out of 4-bit linears), adapter inputs and dropout masks
    mask = 0 if lora_dropout <= 0 else 1 if device == "cuda" else 4  # CUDA bool, CPU fp32 noise
    lora_inputs = sum(m.in_features for m in base.modules() if getattr(m, "lora_A", None))  # all layers
    per_token = 8 * hidden + 4 * c * heads * head_dim + 3 * inter * (stored if nf4 else c)
    eager = base.config._attn_implementation == "eager"
    b, s = batch_size, seq_len
    # ... and per row: SDPA's float copy of the mask; eager attention's fp32 probabilities and their copy
    layer = b * s * (per_token + c * s + ((4 + c) * heads * s if eager else 0))
    inputs = b * s * (c + mask) * lora_inputs
    # checkpointing keeps each layer's input, and one layer is live again in its backward
    if gradient_checkpointing:
        activations = layers * stored * b * s * hidden + layer + inputs // layers
    else:
        activations = layers * layer + inputs
    # autocast's compute-dtype copies of fp32 weights (LM head, LoRA's decoder linears), kept for backward
    linear = sizes["body"] // (layers if gradient_checkpointing else 1)
    copies = 0 if stored == c else c * (sizes["head"] + (0 if nf4 else linear))
    logits = 12 * max(1, round(b * s / 2)) * vocab  # half the tokens trained: fp32 log-probs, their grad, logits' grad
    kept = activations + copies + logits
    if device == "cuda":
        return round(weights + adapters + kept + CUDA_CONTEXT_BYTES + CUDA_ALLOCATOR_FRACTION * kept)
    return round(weights + adapters + kept + CPU_RUNTIME_BYTES + CPU_ALLOCATOR_FRACTION * kept)


def check_fits(estimate: int, device: str, describe: str, budget_bytes: int | None = None) -> tuple[bool, str]:
    """Does a step of `estimate` bytes fit the device (default budget: the GPU's memory, or the RAM available)?

    Returns:
        (fits, one line: the estimate of `describe` ("batch 2 x 512 tokens (LoRA, ...)") and usable memory);
        (True, "... skipped") on a device other than cuda or cpu.
    """
    band, margin = ESTIMATE_ERROR_BAND, DEFAULT_SAFETY_MARGIN
    if device not in ("cuda", "cpu"):
        return True, f"memory estimate skipped: no model of {device} memory"
    if budget_bytes is None:
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if device == "cuda" else 0
        budget_bytes = gpu or psutil.virtual_memory().available
    usable = budget_bytes * (1 - margin)
    fits = estimate * (1 + band) <= usable
    message = (
        f"memory estimate {estimate / GIB:.2f} GiB (+{band:.0%} estimate error {estimate * (1 + band) / GIB:.2f}) "
        f"for {describe} vs {usable / GIB:.2f} GiB usable on {device} ({budget_bytes / GIB:.1f} GiB, {margin:.0%} margin)"
    )
    return fits, message
