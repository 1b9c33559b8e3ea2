"""common.loss against independent references: transformers' own loss and a plain cross-entropy.

    python -m pytest -q tests/test_loss.py

`compute_token_losses` never builds the full logits (it applies the LM head at trained positions
only), so it is checked here against code that does: the model's own `labels=` loss and
`F.cross_entropy` over the full logits, shifted by hand. The validation loss's bootstrap interval is
checked against the normal approximation on per-example losses with a known spread.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.data import IGNORE_INDEX, collate_batch, tokenize_records
from common.loss import compute_token_losses, evaluate_loss
from tests.conftest import make_conversation


@pytest.fixture(scope="module")
def padded_batch(tiny_model_dir):
    """A LoRA model whose adapter changes the logits, and a right-padded batch of 3 unequal conversations."""
    from common.lora import apply_lora
    from common.model import load_model_and_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # a zero lora_B would hide a loss that skipped the adapter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.eval()
    records = [make_conversation(i) for i in range(3)]
    records[1]["messages"][-1]["content"] += " A longer rationale." * 5
    examples, _ = tokenize_records(records, tokenizer, 512)
    batch = collate_batch(examples, tokenizer.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) == 3 and (batch["attention_mask"] == 0).any()  # really padded
    return model, tokenizer, batch, lengths


def test_token_losses_equal_plain_cross_entropy_on_full_logits(padded_batch):
    """Row sums and counts equal F.cross_entropy of logits[:, t] against labels[:, t + 1], computed here"""
    model, _, batch, _ = padded_batch
    with torch.no_grad():
        loss_sum, count = compute_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    assert count.tolist() == (targets != IGNORE_INDEX).sum(1).tolist()
    torch.testing.assert_close(loss_sum, per_token.sum(1), rtol=1e-5, atol=1e-4)


def test_token_losses_equal_transformers_own_loss_row_by_row(padded_batch):
    """Each row without padding through `model(input_ids, labels=labels).loss` (transformers shifts the
    labels itself): its mean times the row's trained tokens is our row sum; the batch mean matches too"""
    model, _, batch, lengths = padded_batch
    with torch.no_grad():
        loss_sum, count = compute_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        for row, length in enumerate(lengths):
            ids, labels = batch["input_ids"][row : row + 1, :length], batch["labels"][row : row + 1, :length]
            reference = model(input_ids=ids, labels=labels).loss
            torch.testing.assert_close(loss_sum[row] / count[row], reference, rtol=1e-5, atol=1e-5)
        whole = model(**batch).loss  # padded batch, mean over every trained token of the batch
    torch.testing.assert_close(loss_sum.sum() / count.sum(), whole, rtol=1e-5, atol=1e-5)


def test_untrained_model_loss_is_near_log_vocab(tiny_model_dir, padded_batch):
    """A random model with small weights predicts ~uniformly: mean loss ~ ln(vocab) (10.80 for 49,152)"""
    from transformers import AutoModelForCausalLM

    _, tokenizer, batch, _ = padded_batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        loss_sum, count = compute_token_losses(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    mean = float(loss_sum.sum() / count.sum())
    assert mean == pytest.approx(math.log(len(tokenizer)), abs=0.05)


class FixedLosses(torch.nn.Module):
    """Stands in for the prepared TrainedTokenLoss: returns the batch's given per-row loss sums and counts."""

    def forward(self, loss_sum: torch.Tensor, count: torch.Tensor):
        return loss_sum, count


class OneProcess:
    """The two Accelerator methods evaluate_loss uses, for one process."""

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def gather_for_metrics(self, tensors):
        return tensors


def test_validation_loss_interval_is_a_95_percent_interval():
    """400 examples of 10 tokens, per-token loss 2 +- 0.5 (sd of the example means): the bootstrap 95%
    half-width is 1.96 * 0.5 / sqrt(400) = 0.049; a 50% interval would be 0.017, a 99% one 0.064"""
    generator = torch.Generator().manual_seed(0)
    means = 2.0 + 0.5 * torch.randn(400, generator=generator, dtype=torch.float64)
    counts = torch.full((400,), 10.0, dtype=torch.float64)
    batches = [{"loss_sum": s * 10, "count": c} for s, c in zip(means.split(50), counts.split(50))]
    result = evaluate_loss(FixedLosses(), batches, OneProcess(), bootstrap=2000, seed=0)
    assert result["val_loss"] == pytest.approx(float(means.mean()))
    assert result["val_tokens"] == 4000 and result["val_examples"] == 400
    normal = 1.96 * float(means.std()) / math.sqrt(400)
    assert result["val_loss_ci95"] == pytest.approx(normal, rel=0.1)
