"""Fault injection for the tests, patched into train.py from outside (train.py has no test-only flags).

inject_faults(monkeypatch, loss={2}, grad={4})   # optimizer step 2's loss NaN, step 4's gradients inf
inject_faults(monkeypatch, stop=11)              # crash right after micro-batch 11: nothing saved
"""

from __future__ import annotations

import pytest

import train


def inject_faults(monkeypatch: pytest.MonkeyPatch, loss: set = frozenset(), grad: set = frozenset(), stop: int = 0):
    """Patch train.py so the given optimizer steps see a NaN loss (and NaN gradients) or inf gradients,
    and the run raises SystemExit right after micro-batch `stop` (0: never), as a kill would."""
    current = {"step": 0}

    class FaultyLoss(train.TrainedTokenLoss):
        def forward(self, input_ids, attention_mask, labels):
            row_losses, counts = super().forward(input_ids, attention_mask, labels)
            poisoned = self.training and current["step"] in loss
            return (row_losses * float("nan") if poisoned else row_losses), counts

    forward_backward, clip_gradients = train.forward_backward, train.clip_gradients

    def faulty_forward_backward(run, batches, state, loss_scale):
        current["step"] = state.global_step + 1
        if stop and state.micro_step < stop <= state.micro_step + len(batches):
            forward_backward(run, batches[: stop - state.micro_step], state, loss_scale)
            raise SystemExit(f"error: injected crash after micro-step {state.micro_step}")
        return forward_backward(run, batches, state, loss_scale)

    def faulty_clip_gradients(run, trainable, rescale):
        if current["step"] in grad:
            trainable[0].grad.fill_(float("inf"))
        return clip_gradients(run, trainable, rescale)

    monkeypatch.setattr(train, "TrainedTokenLoss", FaultyLoss)
    monkeypatch.setattr(train, "forward_backward", faulty_forward_backward)
    monkeypatch.setattr(train, "clip_gradients", faulty_clip_gradients)
