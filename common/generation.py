"""Greedy assistant replies for a few prompts (train.py's samples): `model.generate` on left-padded batches.

evaluate.py's hundreds of replies use common/fast_generation.py (continuous batching, LoRA merged),
which gives the same greedy text faster.
"""

from collections.abc import Iterator

import torch
from transformers import GenerationConfig

# The ids generation stops at: the end-of-turn token the label mask trains, then eos if different.
from common.data import end_of_turn_token_ids as end_of_turn_ids


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its final assistant turn: what a reply is generated for."""
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last]


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation, chat template and generation prompt applied."""
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def generate_batches(
    model, prompt_ids: list[list[int]], stop_ids: list[int], batch_size: int, max_new_tokens: int, pad_token_id: int
) -> Iterator[tuple[int, list[int]]]:
    """Greedy `model.generate` in length-sorted, left-padded batches. Yields (index into `prompt_ids`, the
    reply's new token ids up to and including its first stop id)."""
    device = next(model.parameters()).device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_token_id
    )
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    for first in range(0, len(order), batch_size):
        rows = order[first : first + batch_size]
        width = max(len(prompt_ids[i]) for i in rows)
        input_ids = torch.tensor([[pad_token_id] * (width - len(prompt_ids[i])) + prompt_ids[i] for i in rows])
        mask = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in rows])
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
        )
        for row, ids in zip(rows, output[:, width:].tolist(), strict=True):
            end = next((k + 1 for k, token in enumerate(ids) if token in stop_ids), len(ids))
            yield row, ids[:end]


def generate_replies(model, tokenizer, prompts: list[list[dict]], batch_size: int, max_new_tokens: int) -> list[str]:
    """The greedy next assistant reply of each conversation (decoded, stripped), in the caller's autocast context;
    the model runs in eval mode (no dropout) and gets its training mode back afterwards."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    stop_ids = end_of_turn_ids(tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = model.training
    model.eval()
    try:
        replies = dict(generate_batches(model, prompt_ids, stop_ids, batch_size, max_new_tokens, pad_token_id))
    finally:
        model.train(was_training)
    return [tokenizer.decode(replies[i], skip_special_tokens=True).strip() for i in range(len(prompts))]
