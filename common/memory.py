"""A training configuration (`Setup`) and the architecture sizes of a Llama-style decoder, for the memory
estimator (common/memory_estimator.py, profile_memory.py); train.py's pre-flight is common/preflight.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.lora import parse_target_modules

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    """The decoder linears LoRA targets, in layer order (MemoryEstimateError: not a Llama-style linear)."""
    names = parse_target_modules(target_modules) if isinstance(target_modules, str) else target_modules
    names = LINEAR_MODULES if names == "all-linear" else names
    unknown = [name for name in names if name not in LINEAR_MODULES]
    if unknown or not names:
        raise MemoryEstimateError(
            f"target modules {unknown or names} unknown; use names from {', '.join(LINEAR_MODULES)} or all-linear"
        )
    return [name for name in LINEAR_MODULES if name in names]


def describe_architecture(config) -> dict:
    """The sizes the estimates need from a Llama-style decoder's config (MemoryEstimateError: one is missing)."""
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
