"""The loss on trained tokens only, and the validation loss.

The LM head runs only at positions whose (shifted) label is trained, so the vocab x tokens logits are never
materialized for system/user/padding tokens: the summed cross-entropy over trained tokens, which train.py
divides by the number of trained tokens of the whole effective batch.
"""

import math
import time

import torch
import torch.nn.functional as F

from common.data import IGNORE_INDEX


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM inside a PEFT model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def compute_token_losses(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 loss sum, trained-token count) per row: next-token cross-entropy over the positions whose
    label (aligned with input_ids; the shift happens here) is not -100."""
    base = base_causal_lm(model)
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
    loss_sum = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_losses)
    return loss_sum, mask.sum(dim=1)


class TrainedTokenLoss(torch.nn.Module):
    """Wrap a causal LM so `forward(batch)` returns per-example (summed loss, trained tokens). Accelerate prepares
    the wrapper, so DDP/FSDP and autocast see the whole computation, in training and evaluation alike."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """Return (loss summed over each row's trained tokens, trained tokens per row), shape (batch,)."""
        return compute_token_losses(self.model, input_ids, attention_mask, labels)

    def tie_weights(self) -> None:
        """Re-tie the wrapped model's embeddings: Accelerate's FSDP2 `cpu_ram_efficient_loading` unties them (to the
        meta device and back), then calls this; without it a tied-embedding model (SmolLM2, Qwen2.5 <= 3B) would
        hold and shard two embedding copies."""
        self.model.tie_weights()


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, dataloader, accelerator, bootstrap: int = 200, seed: int = 0) -> dict:
    """{"val_loss", "val_ppl", "val_tokens", "val_examples", "val_loss_ci95", "eval_time_s"}: mean cross-entropy and
    perplexity over every trained token of a prepared dataloader, the 95% interval's half-width from `bootstrap`
    resamples of examples. `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch
    across ranks, so every example counts once."""
    start, was_training = time.perf_counter(), model.training
    model.eval()
    gathered = []  # per batch: (loss sums, trained tokens) of every rank's rows
    for batch in dataloader:
        with accelerator.autocast():
            gathered.append(accelerator.gather_for_metrics(model(**batch)))
    model.train(was_training)
    losses, counts = (torch.cat(column).double().cpu() for column in zip(*gathered, strict=True))
    mean = float(losses.sum() / counts.sum().clamp_min(1.0))
    half_width = 0.0
    if bootstrap > 0 and len(losses) > 1:
        picks = torch.randint(len(losses), (bootstrap, len(losses)), generator=torch.Generator().manual_seed(seed))
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
