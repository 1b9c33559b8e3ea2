"""Loss on trained tokens only, evaluation loss, FLOP accounting and safetensors-only checkpoints.

The loss runs the decoder, then applies the LM head only at positions whose (shifted) label is
trained, so the vocab x tokens logits are never materialized for system/user/padding tokens. The
math is unchanged: the summed cross-entropy over trained tokens, later divided by the number of
trained tokens of the whole effective batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.data import IGNORE_INDEX

COMPLETE_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def _base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compute_token_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy per row, over trained (label != -100) positions only.

    Args:
        model: a causal LM or a PEFT model around one.
        input_ids, attention_mask, labels: (batch, length) tensors; labels are aligned with
            input_ids (the shift happens here).

    Returns:
        (loss_sum per row in float32, trained-token count per row), both of shape (batch,).
    """
    base = _base_causal_lm(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    shift_labels = labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    rows = mask.nonzero(as_tuple=True)[0]
    if decoder is None:  # unusual architecture: fall back to full logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][mask])
    token_losses = F.cross_entropy(logits.float(), shift_labels[mask], reduction="none")
    loss_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    loss_sum = loss_sum.index_add(0, rows, token_losses)
    return loss_sum, mask.sum(dim=1)


class TrainedTokenLoss(torch.nn.Module):
    """Wrap a causal LM so `forward(batch)` returns per-example (summed loss, trained tokens).

    The wrapper is what Accelerate prepares, so DDP/FSDP and autocast see the whole computation,
    for training (sum the rows) and for evaluation (gather the rows) alike.
    """

    def __init__(self, model: torch.nn.Module):
        """Args: model: the (PEFT) causal LM to wrap; kept as `self.model`."""
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """Return (loss summed over each row's trained tokens, trained tokens per row), shape (batch,)."""
        return compute_token_losses(self.model, input_ids, attention_mask, labels)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataloader, accelerator, bootstrap: int = 200, seed: int = 0) -> dict:
    """Mean cross-entropy and perplexity over every trained token of a dataloader.

    Per-example sums are gathered with `gather_for_metrics`, which drops the samples Accelerate
    repeats to even out the last batch across ranks, so every validation example counts once.

    Args:
        model: the prepared `TrainedTokenLoss` (or anything returning per-row loss sums and counts).
        dataloader: a prepared dataloader; each rank sees its shard.
        accelerator: for autocast and gathering.
        bootstrap: resamples of examples for the 95% interval of the mean loss (0 to skip).
        seed: seed of the bootstrap resampling.

    Returns:
        {"val_loss", "val_ppl", "val_tokens", "val_examples", "val_loss_ci95" (half-width),
         "eval_time_s"}; the model is back in train mode afterwards.
    """
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    losses, counts = [], []
    for batch in dataloader:
        with accelerator.autocast():
            loss_sum, count = model(**batch)
        loss_sum, count = accelerator.gather_for_metrics((loss_sum, count))
        losses.append(loss_sum.double().cpu())
        counts.append(count.double().cpu())
    model.train(was_training)
    losses, counts = torch.cat(losses), torch.cat(counts)
    mean = float(losses.sum() / counts.sum().clamp_min(1.0))
    half_width = 0.0
    if bootstrap > 0 and len(losses) > 1:
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(losses), (bootstrap, len(losses)), generator=generator)
        means = losses[picks].sum(1) / counts[picks].sum(1)
        low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
        half_width = (high - low) / 2
    return {
        "val_loss": mean,
        "val_ppl": math.exp(min(mean, 50.0)),
        "val_tokens": int(counts.sum()),
        "val_examples": len(losses),
        "val_loss_ci95": half_width,
        "eval_time_s": time.perf_counter() - start,
    }


def count_matmul_params(model: torch.nn.Module) -> dict:
    """Parameters that take part in matmuls, split as the FLOP formula needs them.

    Returns:
        {"body": decoder linear weights (quantized counted logically), "head": LM head weights,
         "lora": adapter weights, "layers", "hidden", "heads"}
    """
    base = _base_causal_lm(model)
    head = base.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    body, lora = 0, 0
    for name, module in base.named_modules():
        if "lora_" in name:
            if isinstance(module, torch.nn.Linear):
                lora += module.weight.numel()
            continue
        if module is head or not hasattr(module, "weight") or module.weight is None:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit":
            body += module.in_features * module.out_features
    config = base.config
    return {
        "body": body,
        "head": head_params,
        "lora": lora,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def estimate_train_flops(params: dict, tokens: int, trained_tokens: int, sum_sq_len: int) -> float:
    """FLOPs of one LoRA training step (forward + backward), by the formula stated in the README.

    flops = 4 * N_body * tokens            (forward 2N, backward 2N for activation grads; frozen
                                            base weights need no weight grads)
          + 6 * N_lora * tokens            (adapters: forward, activation and weight grads)
          + 4 * N_head * trained_tokens    (LM head only on trained positions)
          + 12 * layers * hidden * sum(len^2) / 2  (causal attention scores and values, fwd + bwd)

    Args:
        params: from `count_matmul_params`.
        tokens: non-padding tokens in the step.
        trained_tokens: tokens with a label.
        sum_sq_len: sum over sequences of (non-padding length)^2.

    Returns:
        Estimated FLOPs.
    """
    attention = 12 * params["layers"] * params["hidden"] * sum_sq_len / 2
    return 4 * params["body"] * tokens + 6 * params["lora"] * tokens + 4 * params["head"] * trained_tokens + attention


# --- checkpoints: safetensors for tensors, JSON for everything else (no pickle anywhere) ---


def optimizer_state_to_files(state_dict: dict) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able metadata."""
    tensors, meta = {}, {"param_groups": state_dict["param_groups"], "state": {}}
    for index, param_state in state_dict["state"].items():
        meta["state"][str(index)] = {}
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(index)][key] = {"tensor": f"{index}.{key}"}
            else:
                meta["state"][str(index)][key] = value
    return tensors, meta


def optimizer_state_from_files(tensors: dict, meta: dict) -> dict:
    """Inverse of `optimizer_state_to_files`."""
    state = {}
    for index, param_state in meta["state"].items():
        state[int(index)] = {
            key: tensors[value["tensor"]] if isinstance(value, dict) and "tensor" in value else value
            for key, value in param_state.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def write_json(path: Path, data: object) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints (with the COMPLETE marker), oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.glob("step_*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_checkpoint(path: Path) -> None:
    """Verify a checkpoint folder: COMPLETE marker present, every safetensors file readable.

    Raises:
        CheckpointError: naming the folder or the unreadable file.
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{path} has no {COMPLETE_MARKER} marker: it was not fully written; use another checkpoint"
        )
    try:  # COMPLETE holds {"sha256": {file: digest}}; older checkpoints hold only a timestamp
        expected = json.loads((path / COMPLETE_MARKER).read_text()).get("sha256", {})
    except (json.JSONDecodeError, AttributeError):
        expected = {}
    for name, digest in sorted(expected.items()):
        if not (path / name).is_file() or sha256_of(path / name) != digest:
            raise CheckpointError(
                f"{path / name} is corrupted (sha256 differs from the one recorded in {COMPLETE_MARKER}); "
                "use an earlier checkpoint"
            )
    for file in sorted(path.glob("*.safetensors")):
        try:
            load_file(file)
        except Exception as err:  # safetensors raises several types for truncated/corrupted files
            raise CheckpointError(
                f"{file} is corrupted ({type(err).__name__}: {err}); use an earlier checkpoint"
            ) from None


def assert_finite(tensors: dict, where: str) -> None:
    """Raise if any tensor holds NaN/inf: such weights must never be saved as best/final/export.

    Raises:
        CheckpointError: naming the first non-finite tensor.
    """
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{where}: tensor {name} has non-finite values; refusing to save or export it")


def save_file_atomic(tensors: dict, path: Path) -> None:
    """safetensors `save_file` to a temp name, then rename into place."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def publish_folder(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically replace `final_dir` by `tmp_dir` and write its COMPLETE marker last."""
    final_dir = Path(final_dir)
    # hash before the rename: the marker then vouches for exactly the bytes that were written
    digests = {p.name: sha256_of(p) for p in sorted(Path(tmp_dir).glob("*.safetensors"))}
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    marker = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "sha256": digests}
    (final_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    if old.exists():
        shutil.rmtree(old)
