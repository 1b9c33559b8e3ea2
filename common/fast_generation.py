"""Fast greedy replies for evaluate.py: continuous batching over a growing KV cache, LoRA merged.

The same text as common/generation.py's `generate_replies` (train.py's few samples, one
`model.generate` per batch), faster. Why not `generate` for hundreds of replies: a batch runs until
its longest row ends, so a row that repeats itself to `max_new_tokens` keeps every finished row in
the batch; the default `DynamicCache` concatenates the whole cache at every step; and an unmerged
LoRA layer runs two extra matmuls per linear per token. Here:

- prompts are sorted by length and prefilled in groups; each decode step runs only unfinished rows;
  a row leaves the batch the step it ends (a row from the end of the batch takes its place: only that
  row's cache is copied), and when a quarter of the slots are free the next prompts are prefilled
  and join (their cache left-padded to the running one's length);
- a caller may add prompts while the decode runs (`generate_replies(follow_up=...)`: the next turn
  of a conversation, written with the reply that just ended); they join the same running batch, so
  turn-by-turn generation does not wait for the slowest reply of each turn, and the positions such a
  prompt shares with the ended row (its conversation and reply) are taken from that row's cache: only
  the new turn is prefilled;
- a prompt that is the beginning of another prompt (an asking turn of a conversation whose final
  reply is also generated) is not prefilled again: its cache is the first positions of the longer
  prompt's, and its first token comes from the longer prompt's hidden state at its last position;
- the cache appends into spare room (CACHE_SPARE positions, reallocated when full) instead of
  concatenating at every step, and a decode step attends each layer's whole contiguous buffer with the
  spare room masked (a view of its first positions is copied by a bf16 bmm at every layer and step);
- a LoRA adapter is merged into the base weights while generating, and the base weights are copied
  back exactly afterwards (bit-exact, not unmerged by subtraction); bf16 linears then run on weights
  packed once for oneDNN (`packed_linears`);
- a decode step's attention (one query per row) is two batched matmuls over the cache, the query heads
  grouped on their shared KV head (`decode_attention`); SDPA's CPU flash kernel took 7.5 ms per layer and
  step at 64 rows, a quarter of the generation time; prefill keeps SDPA;
- greedy: the next token is the argmax of the last position's logits, as `generate(do_sample=False)`;
  outputs equal it up to the float noise of a different batch composition;
- optionally (`loop_repeats`, evaluate.py's default 3), a reply that has written the same span of at least
  LOOP_SPAN tokens that many times in a row ends there: a greedy decode that repeats itself does not leave
  the loop, and a base model's looping replies were most of its generation time (evaluate.py on the
  test split with `--own-history`: the base's new tokens 47,778 -> 21,976, its generation 345 -> 168 s).

Models with sliding-window or other non-standard attention caches take the plain `generate` path
(`common.generation.generate_batches`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from common.generation import encode_prompts, end_of_turn_ids, generate_batches
from common.loss import base_causal_lm

REFILL_FREE = 4  # the next prompts are prefilled and join when 1/REFILL_FREE of the rows are free
LOOP_SPAN = 8  # the shortest span whose repeats end a reply (`ends_in_loop`)
CACHE_SPARE = 64  # positions of spare room a cache buffer gets when it is (re)allocated
# True while `decode_with_matmul_attention` runs: a decode step then gets each layer's whole cache buffer
# (contiguous, its spare room masked by `decode_attention`) instead of a view of its first positions,
# which a bf16 bmm would copy at every layer and step (1.5x slower at 64 rows x 600 positions)
_WHOLE_BUFFER = {"on": False}


@dataclass
class GenerationStats:
    """What a `generate_replies` call did (pass one in to have it filled; counts add up across calls).

    Attributes:
        replies: replies generated.
        new_tokens: useful new tokens: each reply's tokens up to and including its end-of-turn token
            (all of them for a reply that hit `max_new_tokens`).
        prompt_tokens: prompt tokens (prefilled or taken from a cache).
        cached_tokens: of those, the ones a follow-up prompt took from the cache of the reply it follows.
        seconds: wall time, prefill and decode.
        looped: replies ended because they repeated a span `loop_repeats` times (`ends_in_loop`).
    """

    replies: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    looped: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Useful new tokens per second."""
        return self.new_tokens / self.seconds if self.seconds else 0.0


def ends_in_loop(ids: list[int], repeats: int, span: int = LOOP_SPAN) -> bool:
    """True when `ids` ends with the same run of at least `span` tokens written `repeats` times in a row.

    Checked after each new token, it fires the first time a reply's end is such a loop; e.g. with span 8 and
    3 repeats, 24 tokens of one 8-token sentence, or 30 of one 10-token sentence, but never a reply whose
    repeats are shorter than `span` tokens each.

    Args:
        ids: a reply's token ids so far.
        repeats: how many times in a row (below 2: never).
        span: the shortest run counted.

    Returns:
        Whether the reply ends in such a loop.
    """
    if repeats < 2 or len(ids) < repeats * span:
        return False
    last = ids[-1]
    for length in range(span, len(ids) // repeats + 1):
        if ids[-1 - length] == last and ids[-repeats * length :] == ids[-length:] * repeats:
            return True
    return False


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for generation: SDPA for a prefill, two batched matmuls for a decode step (one query per row).

    Registered with transformers' attention interface as "decode_matmul" (masks as for "sdpa": boolean,
    True where a position is attended). query (rows, heads, queries, dim), key / value (rows, KV heads,
    positions, dim); returns (rows, queries, heads, dim) and no weights.
    """
    rows, heads, queries, dim = query.shape
    if queries != 1 or dropout or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    spare = key.shape[-2] - attention_mask.shape[-1] if attention_mask is not None else 0
    if spare > 0:  # a whole cache buffer (`_AppendLayer.update`): its spare room is masked
        fill = False if attention_mask.dtype == torch.bool else torch.finfo(attention_mask.dtype).min
        attention_mask = torch.nn.functional.pad(attention_mask, (0, spare), value=fill)
    kv_heads = key.shape[1]
    grouped = query.view(rows, kv_heads, heads // kv_heads, dim)  # the query heads that share each KV head
    # K @ Q^T, not Q @ K^T: the cache is a view into a longer buffer, which a transposed bf16 bmm operand
    # would copy whole every step (4x slower at 64 rows and 340 positions, benchmarks/decode_attention.py)
    scores = torch.matmul(key, grouped.transpose(-1, -2)).transpose(-1, -2).contiguous()
    scores = scores * (dim**-0.5 if scaling is None else scaling)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # (rows, 1, 1, positions)
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    output = torch.matmul(scores.softmax(-1, dtype=torch.float32).to(value.dtype), value)
    return output.reshape(rows, heads, 1, dim).transpose(1, 2), None


def decode_mask(*args, **kwargs) -> torch.Tensor:
    """`sdpa_mask`, never skipped for a causal shortcut: a decode step on a whole cache buffer needs it."""
    return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})


ALL_ATTENTION_FUNCTIONS.register("decode_matmul", decode_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("decode_matmul", decode_mask)


class _AppendLayer(DynamicLayer):
    """A cache layer that appends into spare room (CACHE_SPARE positions), with batch-row and left-column drops.

    `keys` / `values` are views of the first `length` positions of the buffers. The buffers are
    contiguous and zero where nothing was written (a spare position holds a finite value).
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the new positions and return every cached position (views, no copy).

        In a decode step (one new position) under `decode_with_matmul_attention`, the whole buffers
        instead: the positions past the cached ones are spare room, which `decode_attention` masks.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = self._v = None
        length, added = self.get_seq_length(), key_states.shape[-2]
        if self._k is None or length + added > self._k.shape[-2]:
            self._reserve(length + added, key_states, value_states)
        self._k[..., length : length + added, :] = key_states
        self._v[..., length : length + added, :] = value_states
        self.keys, self.values = self._k[..., : length + added, :], self._v[..., : length + added, :]
        if added == 1 and _WHOLE_BUFFER["on"]:
            return self._k, self._v
        return self.keys, self.values

    def _reserve(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Grow the buffers to `needed` + CACHE_SPARE positions, keeping what is cached."""
        length = self.get_seq_length()
        shape = list(key_states.shape)
        shape[-2] = needed + CACHE_SPARE
        k, v = key_states.new_zeros(shape), value_states.new_zeros([*shape[:-1], value_states.shape[-1]])
        if length:
            k[..., :length, :], v[..., :length, :] = self.keys, self.values
        self._k, self._v = k, v

    def fill_holes(self, holes: torch.Tensor, movers: torch.Tensor, rows: int) -> None:
        """Copy rows `movers` into rows `holes`, then keep the first `rows` rows (views: nothing else moves)."""
        length = self.get_seq_length()
        if len(holes):
            self._k[holes, :, :length] = self._k[movers, :, :length]
            self._v[holes, :, :length] = self._v[movers, :, :length]
        self._k, self._v = self._k[:rows], self._v[:rows]
        self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]

    def drop_left(self, columns: int) -> None:
        """Forget the first `columns` positions (padding of every remaining row); the buffers stay contiguous."""
        self._k, self._v = self._k[..., columns:, :].contiguous(), self._v[..., columns:, :].contiguous()
        length = self.keys.shape[-2] - columns
        self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]

    @classmethod
    def from_rows(cls, rows: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> _AppendLayer:
        """A layer holding each (keys, values) pair (KV heads, positions, dim) as a row, right-aligned in `width` columns."""
        keys, values = rows[0]
        shape = [len(rows), keys.shape[0], width + CACHE_SPARE, keys.shape[-1]]
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._k, layer._v = keys.new_zeros(shape), values.new_zeros([*shape[:-1], values.shape[-1]])
        for j, (k, v) in enumerate(rows):
            layer._k[j, :, width - k.shape[1] : width], layer._v[j, :, width - v.shape[1] : width] = k, v
        layer.keys, layer.values = layer._k[..., :width, :], layer._v[..., :width, :]
        return layer

    def take_prefixes(self, sources: list[int], starts: list[int], lengths: list[int]) -> None:
        """Make row j the `lengths[j]` positions of row `sources[j]` from column `starts[j]`, right-aligned."""
        width = self.get_seq_length()
        shape = [len(sources), self.keys.shape[1], width + CACHE_SPARE, self.keys.shape[-1]]
        k, v = self.keys.new_zeros(shape), self.values.new_zeros([*shape[:-1], self.values.shape[-1]])
        for j, (source, start, length) in enumerate(zip(sources, starts, lengths, strict=True)):
            k[j, :, width - length : width] = self.keys[source, :, start : start + length]
            v[j, :, width - length : width] = self.values[source, :, start : start + length]
        self._k, self._v = k, v
        self.keys, self.values = k[..., :width, :], v[..., :width, :]

    def join(self, other: _AppendLayer, length: int) -> None:
        """Append `other`'s rows below these, both right-aligned (left-padded) to `length` positions."""
        rows = self.keys.shape[0] + other.keys.shape[0]
        shape = [rows, self.keys.shape[1], length + CACHE_SPARE, self.keys.shape[-1]]
        k, v = self.keys.new_zeros(shape), self.values.new_zeros([*shape[:-1], self.values.shape[-1]])
        for start, part in ((0, self), (self.keys.shape[0], other)):  # left padding stays zero
            end, width = start + part.keys.shape[0], part.get_seq_length()
            k[start:end, :, length - width : length], v[start:end, :, length - width : length] = part.keys, part.values
        self._k, self._v = k, v
        self.keys, self.values = k[..., :length, :], v[..., :length, :]


class _AppendCache(DynamicCache):
    """A DynamicCache made of `_AppendLayer`s (created lazily, one per decoder layer)."""

    def __init__(self):
        """An empty cache."""
        Cache.__init__(self, layer_class_to_replicate=_AppendLayer)


@dataclass
class _Batch:
    """The rows being decoded: prompt indices, cache, attention mask, next positions and last tokens."""

    rows: list[int]
    cache: _AppendCache
    mask: torch.Tensor  # (rows, cached positions): 0 on left padding
    positions: torch.Tensor  # (rows,) position of each row's next input token
    last: torch.Tensor  # (rows,) each row's newest token, the next step's input


def prefix_groups(prompt_ids: list[list[int]]) -> list[list[int]]:
    """Group each prompt under the longest prompt that begins with it: [[root, prompts inside it...], ...].

    Args:
        prompt_ids: token ids of each prompt.

    Returns:
        The groups (root first), shortest root first; every prompt index appears exactly once.
    """
    roots: list[int] = []
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i])):
        ids = prompt_ids[i]
        root = next((r for r in roots if prompt_ids[r][: len(ids)] == ids), None)
        if root is None:
            roots.append(i)
            groups[i] = [i]
        else:
            groups[root].append(i)
    return sorted(groups.values(), key=lambda group: len(prompt_ids[group[0]]))


def _cache_name(model) -> str:
    """The name the model's forward takes the KV cache by: `cache` where it has it (transformers >= 5.25 warns
    on the older `past_key_values`), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(base_causal_lm(model).forward).parameters else "past_key_values"


def _decoder_states(model, input_ids, mask, position_ids, cache: Cache) -> tuple[torch.nn.Module, torch.Tensor]:
    """(the base model, its decoder's last hidden states) over `input_ids`, filling `cache`.

    The caller applies the LM head only where it needs logits (as common.loss scores trained positions).
    """
    base = base_causal_lm(model)
    decoder = base.get_decoder()
    states = decoder(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        use_cache=True,
        **{_cache_name(decoder): cache},
    )
    return base, states.last_hidden_state


def _prefill(model, prompt_ids: list[list[int]], groups: list[list[int]], pad_token_id: int, device) -> _Batch:
    """Run the groups' root prompts (left-padded) through the model; every member's first token is the argmax.

    A member's cache is the first positions of its root's, and its first token comes from the root's
    hidden state at the member's last prompt position (causal attention: the same as its own prefill).
    """
    roots = [group[0] for group in groups]
    width = max(len(prompt_ids[i]) for i in roots)
    input_ids = torch.full((len(roots), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(roots), width), dtype=torch.long)
    for r, i in enumerate(roots):
        input_ids[r, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
        mask[r, width - len(prompt_ids[i]) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)  # left padding: each row starts at position 0
    cache = _AppendCache()
    base, hidden = _decoder_states(model, input_ids, mask, position_ids, cache)
    rows = [i for group in groups for i in group]
    sources = [r for r, group in enumerate(groups) for _ in group]
    starts = [width - len(prompt_ids[roots[r]]) for r in sources]  # where each root's prompt begins
    lengths = [len(prompt_ids[i]) for i in rows]
    last = [start + length - 1 for start, length in zip(starts, lengths, strict=True)]
    first_tokens = base.get_output_embeddings()(hidden[sources, last]).argmax(-1)
    if len(rows) > len(roots):
        for layer in cache.layers:
            layer.take_prefixes(sources, starts, lengths)
        mask = torch.arange(width, device=device)[None, :] >= width - torch.tensor(lengths, device=device)[:, None]
        mask = mask.long()
    return _Batch(rows, cache, mask, mask.sum(1), first_tokens)


def _cached_positions(batch: _Batch, r: int, ids: list[int], follow_up: list[int]) -> tuple[int, list]:
    """How many first positions of `follow_up` are row `r`'s cached `ids`, and each layer's (keys, values) there.

    The row's real positions are its mask's ones (a row that itself continued a cache has a gap); at
    least the last prompt position is left to prefill (its logits give the first token).
    """
    shared = 0
    for a, b in zip(ids, follow_up[:-1], strict=False):
        if a != b:
            break
        shared += 1
    columns = batch.mask[r].nonzero().squeeze(1)[:shared]
    return shared, [(layer.keys[r][:, columns], layer.values[r][:, columns]) for layer in batch.cache.layers]


def _prefill_after_cache(model, prompt_ids: list[list[int]], rows: list[int], cached: dict, device) -> _Batch:
    """Prefill each prompt in `rows` after its cached first positions (`cached[i]`: count, per-layer (keys, values)).

    Cached positions are right-aligned in the first columns, the rest of each prompt right-aligned after
    them; the padding between them is masked, and position ids continue from each row's cached count.
    """
    counts, layers = zip(*(cached.pop(i) for i in rows), strict=True)
    rests = [prompt_ids[i][count:] for i, count in zip(rows, counts, strict=True)]
    past, width = max(counts), max(map(len, rests))
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), past + width), dtype=torch.long)
    for r, (count, rest) in enumerate(zip(counts, rests, strict=True)):
        input_ids[r, width - len(rest) :] = torch.tensor(rest)
        position_ids[r, width - len(rest) :] = torch.arange(count, count + len(rest))
        mask[r, past - count : past], mask[r, past + width - len(rest) :] = 1, 1
    cache = _AppendCache()
    cache.layers = [_AppendLayer.from_rows([row[j] for row in layers], past) for j in range(len(layers[0]))]
    input_ids, position_ids, mask = input_ids.to(device), position_ids.to(device), mask.to(device)
    base, hidden = _decoder_states(model, input_ids, mask, position_ids, cache)
    first_tokens = base.get_output_embeddings()(hidden[:, -1]).argmax(-1)
    return _Batch(list(rows), cache, mask, position_ids[:, -1] + 1, first_tokens)


def _join(batch: _Batch | None, new: _Batch | None) -> _Batch | None:
    """One batch of `batch`'s rows and `new`'s, caches and masks left-padded to the longer one."""
    if batch is None or new is None:
        return new if batch is None else batch
    length = max(batch.mask.shape[1], new.mask.shape[1])
    for layer, other in zip(batch.cache.layers, new.cache.layers, strict=True):
        layer.join(other, length)
    masks = [torch.nn.functional.pad(m, (length - m.shape[1], 0)) for m in (batch.mask, new.mask)]
    batch.rows += new.rows
    batch.mask = torch.cat(masks)
    batch.positions = torch.cat([batch.positions, new.positions])
    batch.last = torch.cat([batch.last, new.last])
    return batch


def _keep(batch: _Batch, keep: list[int]) -> _Batch | None:
    """The batch with only the rows at `keep`, and the positions that are padding for all of them dropped.

    Rows that leave are replaced by rows from the end of the batch (only those are copied, not the whole
    cache), so the kept rows' order changes; `batch.rows` says which prompt each row is.
    """
    if not keep:
        return None
    if len(keep) < len(batch.rows):
        kept = set(keep)
        holes = [r for r in range(len(keep)) if r not in kept]
        movers = [r for r in keep if r >= len(keep)]
        order = list(range(len(keep)))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        device = batch.mask.device
        holes_t, movers_t = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
        for layer in batch.cache.layers:
            layer.fill_holes(holes_t, movers_t, len(keep))
        index = torch.tensor(order, device=device)
        batch.rows = [batch.rows[r] for r in order]
        batch.mask, batch.positions, batch.last = batch.mask[index], batch.positions[index], batch.last[index]
    padding = int(batch.mask.any(0).int().argmax())  # leading columns with no real token in any row
    if padding:
        for layer in batch.cache.layers:
            layer.drop_left(padding)
        batch.mask = batch.mask[:, padding:]
    return batch


def greedy_decode(
    model,
    prompt_ids: list[list[int]],
    stop_ids: list[int],
    batch_size: int,
    max_new_tokens: int,
    pad_token_id: int,
    stats: GenerationStats | None = None,
    loop_repeats: int = 0,
) -> Iterator[tuple[int, list[int]]]:
    """Greedy continuous-batching decode; yields (prompt index, new token ids) as each reply ends.

    Args:
        model: a decoder-only causal LM (or a PEFT model around one), in eval mode.
        prompt_ids: token ids of each prompt (chat template applied, generation prompt included).
            Prompts the caller appends to this list while the decode runs (between two yields) are
            decoded too, in the same running batch; the positions one shares with the prompt and reply
            just yielded are taken from that row's cache.
        stop_ids: a reply ends with the first of these it generates (kept in its ids).
        batch_size: at most this many rows decode together.
        max_new_tokens: a reply without a stop token ends after this many tokens.
        pad_token_id: id used for left padding (masked out).
        stats: if given, its `cached_tokens` counts the prompt positions taken from a cache, its `looped`
            the replies ended in a loop.
        loop_repeats: a reply also ends when it has written the same span of LOOP_SPAN or more tokens this
            many times in a row (`ends_in_loop`; 0: never).

    Yields:
        (index into `prompt_ids`, the reply's token ids), in the order replies finish.
    """
    device = next(model.parameters()).device
    stops = torch.tensor(stop_ids, device=device)
    pending = prefix_groups(prompt_ids)  # shortest first; a group is prefilled once, for all its members
    seen = len(prompt_ids)
    generated: dict[int, list[int]] = {}
    cached: dict[int, tuple[int, list]] = {}  # follow-up prompt -> positions taken from its row, their K/V
    cache_name = _cache_name(model)
    batch: _Batch | None = None
    while pending or batch is not None:
        active = 0 if batch is None else len(batch.rows)
        if pending and active <= batch_size - batch_size // REFILL_FREE:  # refill when that many slots are free
            admitted = [pending.pop(0)]
            while pending and active + sum(map(len, admitted)) + len(pending[0]) <= batch_size:
                admitted.append(pending.pop(0))
            plain = [group for group in admitted if group[0] not in cached]
            after = [group[0] for group in admitted if group[0] in cached]  # a follow-up is a group of one
            new = _prefill(model, prompt_ids, plain, pad_token_id, device) if plain else None
            new = _join(new, _prefill_after_cache(model, prompt_ids, after, cached, device) if after else None)
            batch = _join(batch, new)
            generated.update({i: [] for group in admitted for i in group})
            fresh = active  # only the admitted rows have a new token (from their prefill)
        else:
            fresh = 0
            batch.mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
            out = model(
                input_ids=batch.last[:, None],
                attention_mask=batch.mask,
                position_ids=batch.positions[:, None],
                **{cache_name: batch.cache},
                use_cache=True,
            )
            batch.positions = batch.positions + 1
            batch.last = out.logits[:, -1].argmax(-1)
        # batch.last holds each row's newest token: record the fresh ones, and let the rows that ended leave
        stopped = torch.isin(batch.last, stops).tolist()
        keep = list(range(fresh))
        for r, (row, token) in enumerate(zip(batch.rows, batch.last.tolist(), strict=True)):
            if r < fresh:
                continue
            generated[row].append(token)
            looped = not stopped[r] and ends_in_loop(generated[row], loop_repeats)
            if stats is not None and looped:
                stats.looped += 1
            if stopped[r] or looped or len(generated[row]) >= max_new_tokens:
                ids = generated.pop(row)
                yield row, ids
                for i in range(seen, len(prompt_ids)):  # the caller's follow-ups of this reply
                    shared, layers = _cached_positions(batch, r, prompt_ids[row] + ids[:-1], prompt_ids[i])
                    if shared:
                        cached[i] = (shared, layers)
                        if stats is not None:
                            stats.cached_tokens += shared
                    pending.append([i])
                seen = len(prompt_ids)
            else:
                keep.append(r)
        batch = _keep(batch, keep)


def _uses_standard_cache(model) -> bool:
    """True for decoder + LM head models whose every layer is full attention (no sliding window, no linear attention)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    base = base_causal_lm(model)
    has_parts = hasattr(base, "get_decoder") and base.get_output_embeddings() is not None
    return has_parts and layer_types == {"full_attention"} and not getattr(config, "sliding_window", None)


@contextlib.contextmanager
def merged_lora(model) -> Iterator[int]:
    """Merge the active LoRA adapter into the base weights for the duration; copy them back exactly after.

    Merging saves the adapter's two small matmuls per linear per token (and PEFT's Python around
    them). Unmerging by subtraction leaves rounding error in the base (in bf16 a lot), which would
    drift the frozen weights of a run that generates samples mid-training, so the original weights
    are kept and copied back instead. Skipped where there is nothing to merge: not a PEFT model,
    adapters disabled (`disable_adapter()`), or a quantized base (merging re-quantizes).

    Args:
        model: a PEFT model (anything else passes through).

    Yields:
        The number of layers merged (0 when skipped).
    """
    from peft.tuners.lora import LoraLayer

    layers = [
        m
        for m in model.modules()
        if isinstance(m, LoraLayer)
        and not m.disable_adapters
        and not m.merged
        and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)
    ]
    originals = [m.base_layer.weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()
        yield len(layers)
    finally:
        for m, weight in zip(layers, originals, strict=True):
            m.merged_adapters.clear()  # the weight is restored below, not unmerged by subtraction
            with torch.no_grad():
                m.base_layer.weight.copy_(weight)


def _packed_linear(module: torch.nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` on its oneDNN-packed weight (bf16 input), else as usual."""
    if x.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return torch.nn.functional.linear(x, module.weight, module.bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")


@contextlib.contextmanager
def packed_linears(model) -> Iterator[int]:
    """Run the model's bf16 CPU linears on weights packed once for oneDNN, for the duration.

    A bf16 `F.linear` on CPU lays the weight out for oneDNN again at every call; packed once, a decode
    step's few-row matmuls run 1.1-1.6x faster, with the same results (bit for bit on the CPUs measured,
    docs/results.md). Skipped where oneDNN has no bf16; fp32 and CUDA linears are left alone. Enter it
    after `merged_lora` (it packs the weights as they are then).

    Args:
        model: any torch model.

    Yields:
        The number of linears packed.
    """
    layers = []
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        layers = [
            m
            for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
        ]
    try:
        for m in layers:
            packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
            m.forward = functools.partial(_packed_linear, m, packed)
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def decode_with_matmul_attention(model) -> Iterator[None]:
    """Switch a full-attention model that attends with SDPA to `decode_attention` for the duration (others pass)."""
    config = model.config
    before, whole_before = config._attn_implementation, _WHOLE_BUFFER["on"]
    switch = before == "sdpa" and _uses_standard_cache(model)
    if switch:
        config._attn_implementation = "decode_matmul"
    _WHOLE_BUFFER["on"] = switch  # whole buffers only for `decode_attention`, also inside another such context
    try:
        yield
    finally:
        config._attn_implementation, _WHOLE_BUFFER["on"] = before, whole_before


def _in_rounds(
    model, prompt_ids: list[list[int]], stop_ids: list[int], batch_size: int, max_new_tokens: int, pad_token_id: int
) -> Iterator[tuple[int, list[int]]]:
    """`generate_batches` for the plain-generate path, again on the prompts appended while a round ran."""
    first = 0
    while first < len(prompt_ids):
        end = len(prompt_ids)
        for row, ids in generate_batches(
            model, prompt_ids[first:end], stop_ids, batch_size, max_new_tokens, pad_token_id
        ):
            yield first + row, ids
        first = end


@torch.no_grad()
def generate_replies(
    model,
    tokenizer,
    prompts: list[list[dict]],
    batch_size: int,
    max_new_tokens: int,
    progress: str | None = None,
    stats: GenerationStats | None = None,
    follow_up: Callable[[int, str], list[dict] | None] | None = None,
    loop_repeats: int = 0,
) -> list[str]:
    """Greedy-generate the next assistant reply for each prompt conversation.

    Continuous batching (see the module docstring), stopping at the end-of-turn token, with the
    LoRA adapter merged while it runs. Wrap the call in the autocast context you want (e.g.
    `accelerator.autocast()`, `common.artifacts.precision_autocast(choice)`).

    Args:
        model: the (PEFT) causal LM; it is put in eval mode and its mode is restored afterwards.
        tokenizer: its tokenizer (chat template).
        prompts: conversations ending just before the assistant reply to generate.
        batch_size: rows decoded together at most.
        max_new_tokens: generation budget per reply.
        progress: label of a tqdm bar over the prompts, with the useful new tokens/s in its postfix
            (None: no bar).
        stats: if given, the call's counts and time are added to it.
        follow_up: called as `follow_up(index, reply)` when each reply ends (index: its prompt's
            position, counting the prompts follow_up returned after `prompts`); a conversation it
            returns is generated too, in the running batch, and gets the next index.
        loop_repeats: end a reply that has written the same span of LOOP_SPAN or more tokens this many
            times in a row (0: never; the plain-generate path for other caches ignores it).

    Returns:
        The decoded replies (special tokens removed, stripped): those of `prompts`, then those of the
        prompts `follow_up` returned, in the order it returned them.
    """
    if not prompts:
        return []
    start = time.perf_counter()
    prompt_ids = encode_prompts(tokenizer, prompts)
    stop_ids = end_of_turn_ids(tokenizer)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    if _uses_standard_cache(model):
        decode = functools.partial(greedy_decode, stats=stats, loop_repeats=loop_repeats)
    else:
        decode = _in_rounds
    replies, new_tokens = [""] * len(prompts), 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=progress, unit="reply", disable=progress is None)
    try:
        with merged_lora(model), packed_linears(model), decode_with_matmul_attention(model):
            for row, ids in decode(model, prompt_ids, stop_ids, batch_size, max_new_tokens, pad_token_id):
                replies[row] = tokenizer.decode(ids, skip_special_tokens=True).strip()
                new_tokens += len(ids)
                following = None if follow_up is None else follow_up(row, replies[row])
                if following is not None:
                    prompt_ids += encode_prompts(tokenizer, [following])
                    replies.append("")
                    bar.total += 1
                bar.update(1)
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - start):.0f} new tok/s")
    finally:
        bar.close()
        model.train(was_training)
    if stats is not None:
        stats.replies += len(replies)
        stats.new_tokens += new_tokens
        stats.prompt_tokens += sum(len(ids) for ids in prompt_ids)
        stats.seconds += time.perf_counter() - start
    return replies
