"""Measure the peak memory of a few real training steps, to compare with the estimate (profile_memory.py --measure).

    from common.memory import Setup
    from common.memory_measure import compare_to_measurement, measure_in_subprocess
    setup = Setup(2, 256, 16, "q_proj,k_proj,v_proj", dtype="fp32", compute_dtype="bf16", device="cpu")
    measurement = measure_in_subprocess("smollm2-135m-instruct", setup)   # a fresh process
    compare_to_measurement(estimate_memory(config, setup), measurement)["ratio"]

The peak is CUDA's max reserved (and allocated) memory on a GPU, and on a CPU the peak RSS of the
steps minus the RSS of a bare `import torch, transformers` (the child reads it before anything else
loads: this module imports the project's modules inside its functions for that reason).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.memory import Setup


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
    """Return the heap's free pages to the OS, then reset VmHWM to the current RSS; False if unsupported.

    Without the trim, the memory that loading freed stays resident in glibc's heap (on the default model
    in NF4: ~400 MiB of the 1.2 GiB load peak), the reset starts from it, and the steps' peak measured the
    loader's leftovers, by an amount that differed between runs and machines (the QLoRA rows, 704-999 MiB).
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc; other platforms skip it
    except (OSError, AttributeError):
        pass
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


def _load_lora_model(model: str, setup: Setup, dtype: torch.dtype):
    """The base as train.py loads it, with LoRA (alpha 2 x rank) applied, in train mode; and its tokenizer."""
    from common.lora import apply_lora, parse_target_modules
    from common.model import load_model_and_tokenizer

    on_cuda, quantization = setup.device == "cuda", setup.quantization
    base, tokenizer = load_model_and_tokenizer(
        model,
        quantization=quantization,
        dtype=dtype,
        device_map={"": torch.cuda.current_device()} if on_cuda and quantization else None,
    )
    if on_cuda and not quantization:
        base.to("cuda")
    targets = setup.target_modules
    peft_model = apply_lora(
        base,
        rank=setup.rank,
        alpha=2 * setup.rank,
        dropout=setup.lora_dropout,
        target_modules=parse_target_modules(targets) if isinstance(targets, str) else targets,
        quantized=quantization is not None,
        gradient_checkpointing=setup.gradient_checkpointing,
    )
    peft_model.train()
    return peft_model, tokenizer


def _run_steps(loss_model, trainable: list, optimizer, scaler, batch: dict, autocast: dict, steps: int):
    """`steps` training steps on one batch, with train.py's loss: the summed token loss of `TrainedTokenLoss`
    over a constant scale (train.py's `loss_scale`), backward, the gradients rescaled to the per-token mean
    (train.py's `clip_gradients`), clipping, AdamW (GradScaler in fp16).

    Returns:
        (seconds per step, mean token loss per step).
    """
    loss_scale = batch["input_ids"].numel()  # train.py: --max-seq-len x --batch-size
    step_times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(**autocast):
            row_losses, row_counts = loss_model(**batch)
        loss_sum, n_trained = row_losses.sum(), row_counts.sum().item()
        (scaler.scale(loss_sum / loss_scale) if scaler else loss_sum / loss_scale).backward()
        if scaler:
            scaler.unscale_(optimizer)
        torch._foreach_mul_([p.grad for p in trainable if p.grad is not None], loss_scale / max(n_trained, 1))
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss_sum.item() / max(n_trained, 1))  # a host sync: the step ends before the clock stops
        step_times.append(time.perf_counter() - start)
    return step_times, losses


def measure_training_memory(model: str, setup: Setup, steps: int = 2, baseline_bytes: int = 0) -> dict:
    """Run `steps` training steps as train.py does and return the peak memory of the steps.

    Same computation as train.py: `load_model_and_tokenizer` -> `apply_lora` -> `TrainedTokenLoss`,
    autocast in the setup's compute dtype (fp16 with a GradScaler, on a CPU too), backward, clipping,
    AdamW on the adapters. Call it in a fresh process (`measure_in_subprocess`): earlier allocations in
    the same process would hide in the peak.

    Args:
        model: alias, folder or hub id.
        setup: the settings (`dtype` is the loaded base's dtype, for "nf4" the compute dtype).
        steps: training steps (the peak is reached from step 2 on, when AdamW states exist).
        baseline_bytes: peak RSS of the bare process before loading (subtracted on CPU).

    Returns:
        {"device", "peak_bytes", "measured_bytes" (CPU: peak RSS of the steps minus baseline; CUDA:
         max reserved), "baseline_bytes", "load_peak_bytes", "peak_reset", "start_bytes" (CPU: RSS
         above the baseline when the steps began), "max_allocated_bytes",
         "max_reserved_bytes", "tokens", "trained_tokens", "step_times_s", "losses", "dtype", "compute_dtype"}
    """
    from common.loss import TrainedTokenLoss
    from common.memory import DTYPE_NAMES

    torch_dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    device, (dtype, compute_dtype) = setup.device, setup.dtype_names()
    peft_model, tokenizer = _load_lora_model(model, setup, torch_dtypes[dtype])
    loss_model = TrainedTokenLoss(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    # fp16 needs loss scaling on either device (on a CPU, too: torch.amp.GradScaler("cpu"), as train.py)
    scaler = torch.amp.GradScaler(device) if compute_dtype == "fp16" else None
    batch = build_random_batch(len(tokenizer), setup.batch_size, setup.seq_len, setup.trained_fraction)
    batch = {key: value.to(device) for key, value in batch.items()}

    load_peak = _peak_rss_bytes()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        peak_reset = True
    else:
        peak_reset = _reset_peak_rss()
        start_rss = _peak_rss_bytes()
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
    if device == "cuda":
        result["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        result["peak_bytes"] = result["measured_bytes"] = result["max_reserved_bytes"]
    else:
        result["peak_bytes"] = _peak_rss_bytes()
        result["measured_bytes"] = result["peak_bytes"] - baseline_bytes
        result["start_bytes"] = start_rss - baseline_bytes  # the loaded model and libraries, when the steps began
    return result


# The child records its peak RSS right after `import torch, transformers`: that baseline is what
# any training script pays before touching a model, and it is subtracted from the step peak.
_WORKER = """
import json, sys
import torch, transformers
from common.memory_measure import _peak_rss_bytes, measure_training_memory
baseline = _peak_rss_bytes()
from common.memory import Setup
args = json.loads(sys.argv[1])
print(json.dumps(measure_training_memory(args["model"], Setup(**args["setup"]), args["steps"], baseline)))
"""


def measure_in_subprocess(
    model: str, setup: Setup, steps: int = 2, timeout_s: float = 900, extra_env: dict | None = None
) -> dict:
    """Run `measure_training_memory(model, setup, steps)` in a fresh Python process and return its result.

    Args:
        setup: dtypes as names ("fp32", "fp16", "bf16"): the setup travels as JSON.
        timeout_s: give up after this many seconds.
        extra_env: environment variables for the child (e.g. {"MALLOC_MMAP_THRESHOLD_": "131072"}
            makes glibc return freed buffers at once, so the peak RSS is the live-tensor peak).

    Raises:
        RuntimeError: the child failed; the message holds the end of its stderr.
    """
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, **(extra_env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))
    arguments = json.dumps({"model": model, "setup": asdict(setup), "steps": steps})
    result = subprocess.run(
        [sys.executable, "-c", _WORKER, arguments],
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
    from common.preflight import CUDA_CONTEXT_BYTES

    estimated = estimate["total"] - (CUDA_CONTEXT_BYTES if measurement["device"] == "cuda" else 0)
    return {
        "estimated_bytes": estimated,
        "measured_bytes": measurement["measured_bytes"],
        "ratio": estimated / max(measurement["measured_bytes"], 1),
    }
