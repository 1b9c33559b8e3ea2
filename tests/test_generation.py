"""common.fast_generation's continuous-batching greedy decode against transformers' own `generate`, prompt by prompt.

The reference is `model.generate(do_sample=False)` on each prompt alone (no padding, no batch, the
library's cache and stopping), so every path of ours is checked against an independent computation:
rows that stop early and leave the batch, refills that join a running batch with a different cache
length, left-padding columns dropped, the budget cap, the merged adapter and its exact restore. And
common.generation's plain batched `generate` (train.py's samples) gives the same text.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common import generation
from common.fast_generation import (
    ALL_ATTENTION_FUNCTIONS,
    CACHE_SPARE,
    GenerationStats,
    _AppendCache,
    _Batch,
    _keep,
    decode_attention,
    decode_with_matmul_attention,
    ends_in_loop,
    generate_replies,
    greedy_decode,
    merged_lora,
    packed_linears,
    prefix_groups,
)

# Prompts of different lengths (the decode sorts them; refills join batches of other lengths).
PROMPTS = [
    [{"role": "user", "content": "Applicant is 44, smoker."}],
    [{"role": "system", "content": "You underwrite."}, {"role": "user", "content": "Roof 21 years, frame."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Revenue 2.5M, TIV 9M, three claims in five years, sprinklered, hydrant 300 ft."}],
    [
        {"role": "user", "content": "BMI 31"},
        {"role": "assistant", "content": "Age?"},
        {"role": "user", "content": "52"},
    ],
    [{"role": "user", "content": "Term life 500k, non-smoker, age 38, no conditions."}],
    [{"role": "user", "content": "ok"}],
    [{"role": "user", "content": "BMI 31"}],  # the beginning of the conversation two lines up (an asking turn)
    [{"role": "user", "content": "Hi"}],  # the same prompt twice
]


@pytest.fixture(scope="module")
def chatty_model_dir(tmp_path_factory, default_tokenizer):
    """A 2-layer random Llama whose greedy text varies from prompt to prompt.

    The shared tiny model ties its embeddings, so its greedy reply repeats the prompt's last token
    forever; untied weights at std 0.2 give every prompt its own token sequence (and clear argmax
    margins, so batch composition cannot flip a token).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(default_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("chatty-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(chatty_model_dir, default_tokenizer):
    """The chatty tiny model in eval mode and its tokenizer."""
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir).eval()
    return model, default_tokenizer


def prompt_ids(tokenizer, prompts) -> list[list[int]]:
    """Token ids of each prompt with the generation prompt, as generate_replies builds them."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@torch.no_grad()
def reference(model, ids: list[list[int]], stop_ids: list[int], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate on each prompt alone; the new ids up to and including the first stop id."""
    replies = []
    for row in ids:
        output = model.generate(
            torch.tensor([row]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=0
        )[0, len(row) :].tolist()
        end = next((k + 1 for k, token in enumerate(output) if token in stop_ids), len(output))
        replies.append(output[:end])
    return replies


def pick_stops(model, ids: list[list[int]]) -> list[int]:
    """A stop id that ends about half of the rows early: the token found in closest to half of the free runs."""
    free = reference(model, ids, stop_ids=[-1], max_new_tokens=12)
    candidates = sorted({token for run in free for token in run})
    return [min(candidates, key=lambda t: abs(sum(t in run for run in free) - len(free) / 2))]


def test_greedy_decode_equals_generate_on_each_prompt_alone(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, PROMPTS)
    stops = pick_stops(model, ids)
    expected = reference(model, ids, stops, max_new_tokens=12)
    assert any(len(r) < 12 for r in expected) and any(len(r) == 12 for r in expected)  # both ends are exercised
    for batch_size in (1, 3, 16):  # 3: rows leave early and refills join a running batch
        with torch.no_grad(), decode_with_matmul_attention(model):
            got = dict(greedy_decode(model, ids, stops, batch_size, 12, pad_token_id=0))
        assert [got[i] for i in range(len(ids))] == expected, f"batch size {batch_size}"


def test_decode_attention_equals_attention_written_out_per_head():
    """One query per row over a left-padded cache, 8 query heads on 2 KV heads: the grouped matmuls equal
    softmax(q k^T / sqrt(d)) v computed head by head with the KV heads repeated, padding excluded."""
    torch.manual_seed(0)
    rows, heads, kv_heads, positions, dim = 3, 8, 2, 7, 16
    query = torch.randn(rows, heads, 1, dim)
    key, value = torch.randn(rows, kv_heads, positions, dim), torch.randn(rows, kv_heads, positions, dim)
    padding = [0, 2, 5]  # left padding of each row
    mask = torch.tensor([[p <= j for j in range(positions)] for p in padding])[:, None, None, :]
    got, weights = decode_attention(None, query, key, value, mask, scaling=dim**-0.5)
    assert weights is None and got.shape == (rows, 1, heads, dim)
    for r in range(rows):
        for h in range(heads):
            k, v = key[r, h // (heads // kv_heads), padding[r] :], value[r, h // (heads // kv_heads), padding[r] :]
            expected = torch.softmax(query[r, h, 0] @ k.T / dim**0.5, -1) @ v
            torch.testing.assert_close(got[r, 0, h], expected, rtol=1e-5, atol=1e-6)


def test_decode_attention_reads_the_bf16_cache_view_without_copying_it():
    """The cache hands the attention a view of the first positions of a longer buffer, which a bf16 bmm
    copies. Copied as K^T (Q @ K^T) that copy is a transposing gather, 4x slower at 64 rows and 340
    positions than K @ Q^T's row copy: K^T (dim x positions) is never materialized, and the result equals fp32."""
    from torch.profiler import profile

    torch.manual_seed(0)
    rows, heads, kv_heads, positions, dim = 16, 9, 3, 40, 64
    buffers = torch.randn(2, rows, kv_heads, 2 * positions, dim).bfloat16()  # capacity twice the length
    key, value = buffers[0, :, :, :positions], buffers[1, :, :, :positions]
    query = torch.randn(rows, heads, 1, dim).bfloat16()
    mask = torch.ones(rows, 1, 1, positions, dtype=torch.bool)
    with profile(record_shapes=True) as prof:
        got, _ = decode_attention(None, query, key, value, mask)
    copied = [
        event.input_shapes[0]
        for event in prof.events()
        if event.name in ("aten::copy_", "aten::clone", "aten::contiguous") and event.input_shapes
    ]
    assert [dim, positions] not in [shape[-2:] for shape in copied], copied
    expected, _ = decode_attention(None, query.float(), key.float(), value.float(), mask)
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02)


def test_generate_replies_decodes_with_matmul_attention_and_restores_sdpa(tiny, monkeypatch):
    model, tokenizer = tiny
    calls = []
    monkeypatch.setattr("common.fast_generation.torch.matmul", lambda *a: calls.append(1) or torch.Tensor.matmul(*a))
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad(), decode_with_matmul_attention(model):
        assert model.config._attn_implementation == "decode_matmul"
        dict(greedy_decode(model, prompt_ids(tokenizer, PROMPTS[:2]), [-1], 2, 3, pad_token_id=0))
    assert model.config._attn_implementation == "sdpa"
    assert len(calls) == 2 * 2 * model.config.num_hidden_layers  # 2 decode steps x 2 matmuls per layer


def test_a_decode_step_attends_whole_contiguous_cache_buffers_with_the_spare_room_masked(tiny):
    """Under `decode_with_matmul_attention` each decode step gets each layer's whole buffer (contiguous, so a
    bf16 bmm need not copy it), longer than the cached positions; the text equals the view path's."""
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, PROMPTS)
    seen = []

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] == 1:
            seen.append((key.is_contiguous() and value.is_contiguous(), key.shape[-2] - attention_mask.shape[-1]))
        return decode_attention(module, query, key, value, attention_mask, *args, **kwargs)

    with torch.no_grad():
        ALL_ATTENTION_FUNCTIONS.register("decode_matmul", recording)
        try:
            with decode_with_matmul_attention(model):
                whole = dict(greedy_decode(model, ids, [-1], 3, 12, pad_token_id=0))
        finally:
            ALL_ATTENTION_FUNCTIONS.register("decode_matmul", decode_attention)
        views = dict(greedy_decode(model, ids, [-1], 3, 12, pad_token_id=0))  # sdpa on views of the buffers
    assert seen and all(contiguous for contiguous, _ in seen)
    assert all(spare > 0 for _, spare in seen) and max(spare for _, spare in seen) <= CACHE_SPARE
    assert whole == views


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 on this CPU")
def test_packed_linears_give_the_same_logits_and_are_undone(chatty_model_dir):
    """bf16 linears run on oneDNN-packed weights inside `packed_linears` (each one's forward is replaced), with
    the logits of the plain model; afterwards the plain forward is back; an fp32 model is left alone."""
    model = AutoModelForCausalLM.from_pretrained(chatty_model_dir, dtype=torch.bfloat16).eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    ids = torch.randint(0, 200, (3, 9))
    with torch.no_grad():
        plain = model(ids).logits
        with packed_linears(model) as count:
            assert count == len(linears) and all("forward" in m.__dict__ for m in linears)
            packed = model(ids).logits
    assert not any("forward" in m.__dict__ for m in linears)
    torch.testing.assert_close(packed, plain, rtol=0.01, atol=0.01)  # bit-identical on the CPUs measured
    with packed_linears(AutoModelForCausalLM.from_pretrained(chatty_model_dir)) as count:
        assert count == 0


def test_prompts_that_begin_another_share_its_prefill(tiny):
    ids = [[1, 2, 3, 4], [1, 2], [5, 6], [1, 2, 3], [5, 6], [9]]
    assert prefix_groups(ids) == [[5], [2, 4], [0, 3, 1]]  # shortest root first; each root keeps its prefixes
    _model, tokenizer = tiny
    ids = prompt_ids(tokenizer, PROMPTS)
    groups = prefix_groups(ids)
    assert [7, 4] not in groups and any(group[0] == 4 and 7 in group for group in groups)  # an asking turn rides along
    assert sorted(i for group in groups for i in group) == list(range(len(ids)))


def test_rows_that_leave_are_refilled_from_the_end_and_every_row_keeps_its_own_cache():
    # 6 rows, each row's cache filled with its own number; rows 1, 2 and 5 end. The reference is the
    # cache before, indexed by the prompt each row holds after (batch.rows), so any mix-up shows.
    rows, width = 6, 5
    cache = _AppendCache()
    keys = torch.arange(rows, dtype=torch.float32)[:, None, None, None].expand(rows, 2, width, 4).clone()
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[:, :2] = 0  # two columns of left padding under every row ...
    mask[3, 1] = 1  # ... but row 3 starts one column earlier
    for layer in range(2):
        cache.update(keys + 100 * layer, -(keys + 100 * layer), layer)
    batch = _Batch([10, 11, 12, 13, 14, 15], cache, mask, torch.arange(rows), torch.arange(20, 20 + rows))
    kept = _keep(batch, [0, 3, 4])
    assert sorted(kept.rows) == [10, 13, 14] and len(kept.rows) == 3
    for r, prompt in enumerate(kept.rows):
        original = prompt - 10
        for layer in range(2):
            assert torch.equal(kept.cache.layers[layer].keys[r], keys[original, :, 1:] + 100 * layer)
            assert torch.equal(kept.cache.layers[layer].values[r], -(keys[original, :, 1:] + 100 * layer))
        assert kept.positions[r] == original and kept.last[r] == 20 + original
        assert torch.equal(kept.mask[r], mask[original, 1:])  # the column that is padding in every kept row left
    assert _keep(kept, []) is None


def test_a_reply_that_stops_at_once_is_empty_and_finished(tiny):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, PROMPTS[:3])
    first = [r[0] for r in reference(model, ids, stop_ids=[-1], max_new_tokens=1)]
    with torch.no_grad():
        got = dict(greedy_decode(model, ids, [first[1]], batch_size=2, max_new_tokens=5, pad_token_id=0))
    assert got[1] == [first[1]]  # the stop token itself, nothing after it


@pytest.fixture
def lora_model(chatty_model_dir):
    """The tiny model with an all-linear LoRA whose B is random (so the adapter changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model.eval()


def test_merged_adapter_gives_the_unmerged_text_and_restores_the_weights_exactly(lora_model, default_tokenizer):
    model, tokenizer = lora_model, default_tokenizer
    ids = prompt_ids(tokenizer, PROMPTS)
    stops = pick_stops(model, ids)
    unmerged = reference(model, ids, stops, max_new_tokens=10)  # PEFT's own forward, adapter not merged
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged_lora(model) as merged:
        assert merged == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
        changed = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
        assert len(changed) == 14  # the merge really wrote the adapter into the base weights
        with torch.no_grad():
            merged_ids = dict(greedy_decode(model, ids, stops, 3, 10, pad_token_id=0))
    assert [merged_ids[i] for i in range(len(ids))] == unmerged
    for name, param in model.named_parameters():  # bit-exact, not base + delta - delta
        assert torch.equal(param, before[name]), name
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_generate_replies_merges_only_an_enabled_adapter(lora_model, default_tokenizer, chatty_model_dir):
    model, tokenizer = lora_model, default_tokenizer
    base = AutoModelForCausalLM.from_pretrained(chatty_model_dir).eval()
    ids = prompt_ids(tokenizer, PROMPTS[:4])
    stops = pick_stops(base, prompt_ids(tokenizer, PROMPTS))[:1]
    with model.disable_adapter(), merged_lora(model) as merged:
        assert merged == 0  # a disabled adapter is not merged into the base
    with model.disable_adapter(), torch.no_grad():
        off = dict(greedy_decode(model, ids, stops, 4, 8, pad_token_id=0))
    assert [off[i] for i in range(len(ids))] == reference(base, ids, stops, 8)  # the untouched base


@pytest.mark.filterwarnings("error:.*past_key_values.*:FutureWarning")  # the cache is passed by its current name
def test_generate_replies_decodes_and_counts_useful_tokens(tiny, monkeypatch):
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, PROMPTS)
    stops = pick_stops(model, ids)
    monkeypatch.setattr("common.fast_generation.end_of_turn_ids", lambda tokenizer: stops)
    expected = reference(model, ids, stops, max_new_tokens=12)
    stats = GenerationStats()
    replies = generate_replies(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=12, stats=stats)
    assert replies == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in expected]
    assert stats.new_tokens == sum(len(r) for r in expected) and stats.replies == len(PROMPTS)
    assert stats.prompt_tokens == sum(len(r) for r in ids) and stats.seconds > 0
    assert model.training is False


@pytest.mark.parametrize("standard_cache", [True, False], ids=["fast", "plain generate"])
def test_follow_up_prompts_join_the_running_batch_and_get_their_own_reply(tiny, monkeypatch, standard_cache):
    # Each of the first four prompts gets two more turns, each written with the reply before it; the
    # reference is transformers' generate on every prompt alone, the next turns built from its replies.
    # The fast path takes each follow-up's conversation and reply from the ended row's cache (the third
    # turn from a row that itself continued a cache, with a masked gap in it) and prefills only the rest.
    model, tokenizer = tiny
    monkeypatch.setattr("common.fast_generation._uses_standard_cache", lambda model: standard_cache)
    stops = pick_stops(model, prompt_ids(tokenizer, PROMPTS))
    monkeypatch.setattr("common.fast_generation.end_of_turn_ids", lambda tokenizer: stops)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    def next_turn(prompt: list[dict], reply: str, chat: int) -> list[dict]:  # turns of different lengths
        return [*prompt, {"role": "assistant", "content": reply}, {"role": "user", "content": "and then?" * (chat + 1)}]

    turns, expected = [PROMPTS[:4]], []  # [turn][conversation]
    for turn in range(3):
        expected.append([text(r) for r in reference(model, prompt_ids(tokenizer, turns[turn]), stops, 12)])
        turns.append(
            [next_turn(p, r, chat) for chat, (p, r) in enumerate(zip(turns[turn], expected[turn], strict=True))]
        )
    asked = list(turns[0])  # every prompt, in the order generate_replies numbers them
    sources = []  # (turn, conversation) of each prompt, in that order

    def follow_up(index: int, reply: str) -> list[dict] | None:
        turn, chat = sources[index]
        if turn == 2:
            return None
        sources.append((turn + 1, chat))
        asked.append(next_turn(asked[index], reply, chat))
        return asked[-1]

    sources += [(0, chat) for chat in range(4)]
    stats = GenerationStats()
    replies = generate_replies(model, tokenizer, turns[0], 2, 12, stats=stats, follow_up=follow_up)
    assert sorted(sources) == [(turn, chat) for turn in range(3) for chat in range(4)]
    assert replies == [expected[turn][chat] for turn, chat in sources]
    assert asked == [turns[turn][chat] for turn, chat in sources]  # the follow-ups were built from right replies
    assert stats.replies == 12 and stats.prompt_tokens == sum(map(len, prompt_ids(tokenizer, asked)))
    if standard_cache:  # each of the 8 follow-ups took at least the prompt before it, and prefilled >= 1 token
        before = sum(map(len, prompt_ids(tokenizer, turns[0] + turns[1])))
        assert before <= stats.cached_tokens <= stats.prompt_tokens - sum(map(len, prompt_ids(tokenizer, turns[0]))) - 8
    else:
        assert stats.cached_tokens == 0


def test_models_with_other_caches_take_the_plain_generate_path(tiny, monkeypatch):
    """A sliding-window model goes through `model.generate` per batch: the same replies and counts."""
    model, tokenizer = tiny
    ids = prompt_ids(tokenizer, PROMPTS)
    stops = pick_stops(model, ids)
    monkeypatch.setattr("common.fast_generation.end_of_turn_ids", lambda tokenizer: stops)
    monkeypatch.setattr("common.fast_generation._uses_standard_cache", lambda model: False)
    expected = reference(model, ids, stops, max_new_tokens=12)
    stats = GenerationStats()
    replies = generate_replies(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=12, stats=stats)
    assert replies == [tokenizer.decode(r, skip_special_tokens=True).strip() for r in expected]
    assert stats.new_tokens == sum(len(r) for r in expected)


@pytest.mark.parametrize("adapter", [False, True], ids=["base", "unmerged lora"])
def test_trains_plain_generate_gives_the_fast_decoders_text(tiny, lora_model, monkeypatch, adapter):
    """common.generation (train.py's samples: `generate` on one left-padded batch, adapter unmerged) = the fast path."""
    model, tokenizer = (lora_model, tiny[1]) if adapter else tiny
    ids = prompt_ids(tokenizer, PROMPTS)
    stops = pick_stops(model, ids)
    monkeypatch.setattr("common.generation.end_of_turn_ids", lambda tokenizer: stops)
    monkeypatch.setattr("common.fast_generation.end_of_turn_ids", lambda tokenizer: stops)
    expected_ids = reference(model, ids, stops, max_new_tokens=12)
    assert any(len(r) < 12 for r in expected_ids)  # rows that end early wait in the batch for the others
    expected = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in expected_ids]
    model.train()  # as in train.py mid-training: eval mode while generating (no dropout), then back
    plain = generation.generate_replies(model, tokenizer, PROMPTS, len(PROMPTS), 12)
    assert model.training and plain == expected
    assert generate_replies(model, tokenizer, PROMPTS, 3, 12) == plain


def first_loop_end(ids: list[int], span: int = 8, repeats: int = 3) -> int | None:
    """Brute force: the length of the shortest prefix of `ids` that ends with one run of >= span tokens
    written `repeats` times in a row (None: no prefix does)."""
    for end in range(1, len(ids) + 1):
        for length in range(span, end // repeats + 1):
            if all(
                ids[end - k * length : end - (k - 1) * length] == ids[end - length : end] for k in range(2, repeats + 1)
            ):
                return end
    return None


def test_ends_in_loop_fires_at_the_last_token_of_the_third_repeat_of_a_span_of_8_or_more():
    sentence = list(range(100, 110))  # 10 distinct tokens
    reply = [1, 2, 3] + sentence * 3
    assert [ends_in_loop(reply[:n], 3) for n in range(len(reply) - 1, len(reply) + 1)] == [False, True]
    assert not ends_in_loop([1, 2, 3] + sentence * 2, 3) and ends_in_loop([1, 2, 3] + sentence * 2, 2)
    assert not ends_in_loop(sentence * 3 + [7], 3)  # the loop was left: only a loop at the end counts
    short = [5, 6, 7, 8, 9, 10, 11]  # 7 tokens: 3 repeats are not enough, 6 are (14 tokens x 3)
    assert not ends_in_loop(short * 5, 3) and ends_in_loop(short * 6, 3)
    assert ends_in_loop([4] * 24, 3) and not ends_in_loop([4] * 23, 3)  # one token: 3 x 8
    assert not ends_in_loop([4] * 400, 0) and not ends_in_loop([4] * 400, 1)  # off


def test_replies_that_loop_end_at_their_third_repeat_and_are_counted(tiny, tiny_model_dir, default_tokenizer):
    # The tied-embedding tiny model repeats the generation prompt's last token forever: every reply loops
    # (and leaves a batch of 3 that refills); the chatty model's replies do not loop within 60 tokens. The
    # reference is generate's full reply cut where a brute-force scan first finds 3 repeats of >= 8 tokens.
    looping = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for model, loops in ((looping, len(PROMPTS)), (tiny[0], 0)):
        ids = prompt_ids(default_tokenizer, PROMPTS)
        full = reference(model, ids, [-1], max_new_tokens=60)
        cuts = [first_loop_end(r) for r in full]
        assert sum(c is not None for c in cuts) == loops
        stats = GenerationStats()
        with torch.no_grad(), decode_with_matmul_attention(model):
            got = dict(greedy_decode(model, ids, [-1], 3, 60, pad_token_id=0, stats=stats, loop_repeats=3))
            off = dict(greedy_decode(model, ids, [-1], 3, 60, pad_token_id=0))
        assert [got[i] for i in range(len(ids))] == [r if c is None else r[:c] for r, c in zip(full, cuts, strict=True)]
        assert stats.looped == loops and [off[i] for i in range(len(ids))] == full
