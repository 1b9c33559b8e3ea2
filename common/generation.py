"""Batched greedy generation of assistant replies (left padding, stop at the end-of-turn token)."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from common.data import end_of_turn_token_ids


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its final assistant turn: what a reply is generated for."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids generation stops at: the end-of-turn token the label mask trains, then eos if different.

    Derived from the chat template by `common.data.end_of_turn_token_ids` (one algorithm for the
    mask, generation and the exported generation_config).
    """
    return end_of_turn_token_ids(tokenizer)


@torch.no_grad()
def generate_replies(
    model, tokenizer, prompts: list[list[dict]], batch_size: int, max_new_tokens: int, progress: str | None = None
) -> list[str]:
    """Greedy-generate the next assistant reply for each prompt conversation.

    Prompts are sorted by token count so a batch carries little padding; padding goes on the left so
    every row ends with its generation prompt; the KV cache is used; generation stops at the
    end-of-turn token (a batch ends when its last row does). Wrap the call in the autocast context
    you want (e.g. `accelerator.autocast()`, `PrecisionChoice.autocast()`).

    Args:
        model: the (PEFT) causal LM; it is put in eval mode and its mode is restored afterwards.
        tokenizer: its tokenizer (chat template); its padding side is restored afterwards.
        prompts: conversations ending just before the assistant reply to generate.
        batch_size: prompts per `generate` call.
        max_new_tokens: generation budget per reply.
        progress: label of a tqdm bar over the prompts, with the new tokens/s in its postfix
            (None: no bar).

    Returns:
        The decoded replies (special tokens removed, stripped), aligned with `prompts`.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(prompt_ids[i]))
    stop_ids = end_of_turn_ids(tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    replies = [""] * len(texts)
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    bar = tqdm(total=len(texts), desc=progress, unit="reply", disable=progress is None)
    new_tokens_total, start = 0, time.perf_counter()
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            batch = tokenizer.pad({"input_ids": [prompt_ids[i] for i in rows]}, return_tensors="pt")
            output = model.generate(**batch.to(device), generation_config=config)
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for row, i in enumerate(rows):
                replies[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
            # Tokens up to and including each row's end-of-turn: the rest of the row is padding.
            stopped = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device))
            new_tokens_total += int((stopped.cumsum(1) - stopped.int() == 0).sum())
            bar.update(len(rows))
            bar.set_postfix_str(f"{new_tokens_total / (time.perf_counter() - start):.0f} new tok/s")
    finally:
        bar.close()
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return replies
