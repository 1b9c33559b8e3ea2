"""Assistant-only masks and stop tokens for the common chat-template families, offline.

Each family's template is written here with its real layout and special tokens (ChatML for Qwen2.5
and SmolLM2, Llama 3.x with its dated system header, Gemma 2/3 without a system role, Mistral v0.3's
[INST] layout, Phi-3/4), on a local copy of the test tokenizer with those tokens added. For each we
assert exactly which tokens are trained (every reply and its end-of-turn token; no system/user turn,
role header, BOS or padding) and that generation stops at the family's end-of-turn token. Then the
templates that need care: no system role, not prefix-stable, no template, no end-of-turn token,
double BOS, and the --chat-template FILE override.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessor

import train
from common.artifacts import build_generation_config
from common.data import IGNORE_INDEX, DataError, collate_batch, tokenize_messages, tokenize_records
from common.generation import end_of_turn_ids
from common.model import ModelLoadError, load_tokenizer, prepare_chat_template
from tests.conftest import make_conversation, write_jsonl

SYSTEM = "You are an underwriting assistant."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Term life, age 42, 500k, non-smoker."},
    {"role": "assistant", "content": "What is the applicant's BMI?"},
    {"role": "user", "content": "27.5"},
    {"role": "assistant", "content": "Standard class applies.\nDECISION: approve | CLASS: standard | RULES: L-8"},
]
REPLIES = [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]

CHATML_QWEN = r"""
{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}{%- if message.role != 'system' %}
{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
LLAMA3 = r"""
{{- bos_token }}
{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now("%d %b %Y") %}
{%- else %}{%- set date_string = "26 Jul 2024" %}{%- endif %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""
GEMMA = r"""
{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}
{%- for message in messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}
{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}
{{- '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""
MISTRAL_V03 = r"""
{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}
{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- for message in loop_messages %}{%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
{{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
{%- endif %}{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
{%- if message["role"] == "user" %}
{%- if loop.last and system_message is defined %}{{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
{%- else %}{{- "[INST] " + message["content"] + "[/INST]" }}{%- endif %}
{%- elif message["role"] == "assistant" %}{{- " " + message["content"] | trim + eos_token }}
{%- else %}{{- raise_exception("Only user and assistant roles are supported!") }}{%- endif %}
{%- endfor %}
"""
PHI3 = r"""
{%- for message in messages %}
{%- if message['role'] == 'system' and message['content'] %}{{- '<|system|>\n' + message['content'] + '<|end|>\n' }}
{%- elif message['role'] == 'user' %}{{- '<|user|>\n' + message['content'] + '<|end|>\n' }}
{%- elif message['role'] == 'assistant' %}{{- '<|assistant|>\n' + message['content'] + '<|end|>\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}
"""
GEMMA3 = r"""
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}{%- set first_user_prefix = messages[0]['content'] + '\n\n' %}
{%- set loop_messages = messages[1:] %}{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}
{%- for message in loop_messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}
{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}
{{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
{{- message['content'] | trim }}{{- '<end_of_turn>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}
"""
PHI4 = r"""
{%- for message in messages %}
{{- '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_sep|>' }}{%- endif %}
"""
PHI4_MINI = r"""
{%- for message in messages %}{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- else %}{{- eos_token }}{%- endif %}
"""
# The first Phi-3-mini release: no system role (the turn is dropped), the assistant header closes each user turn.
PHI3_MINI_ORIGINAL = r"""
{{- bos_token }}{%- for message in messages %}
{%- if message['role'] == 'user' %}{{- '<|user|>\n' + message['content'] + '<|end|>\n<|assistant|>\n' }}
{%- elif message['role'] == 'assistant' %}{{- message['content'] + '<|end|>\n' }}{%- endif %}
{%- endfor %}
"""
LLAMA3_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Qwen3-style: the reply after the last user turn gets an empty think block, earlier ones do not,
# so turn 1 renders differently once turn 2 follows.
QWEN3_LIKE = r"""
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' and loop.index0 > ns.last_user %}
{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}
{%- else %}{{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# family -> (template or None for the default model's own, special tokens, end-of-turn token, text before a reply)
FAMILIES = {
    "smollm2": (None, {}, "<|im_end|>", ""),
    "qwen2.5": (CHATML_QWEN, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>", ""),
    "llama3": (
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>",
         "extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]},
        "<|eot_id|>", "",
    ),
    "gemma": (
        GEMMA,
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        "<end_of_turn>", "",
    ),
    "mistral-v0.3": (
        MISTRAL_V03,
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "extra_special_tokens": ["[INST]", "[/INST]"]},
        "</s>", " ",
    ),
    "phi3": (
        PHI3,
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "extra_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
        "<|end|>", "",
    ),
    # Llama 3.1/3.2-Instruct: eos is <|eot_id|> itself and there is no pad token
    "llama3.1": (
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": None,
         "extra_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"]},
        "<|eot_id|>", "",
    ),
    "gemma3": (
        GEMMA3,
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        "<end_of_turn>", "",
    ),
    "phi4": (
        PHI4,
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>",
         "extra_special_tokens": ["<|im_start|>", "<|im_sep|>"]},
        "<|im_end|>", "",
    ),
    "phi4-mini": (
        PHI4_MINI,
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "extra_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
        "<|end|>", "",
    ),
    "phi3-mini-original": (
        PHI3_MINI_ORIGINAL,
        {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "extra_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]},
        "<|end|>", "",
    ),
}  # fmt: skip


def build_tokenizer(tiny_model_dir: Path, family: str):
    """A fresh copy of the test tokenizer dressed as `family` (special tokens added, its template set)."""
    template, special_tokens, _, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if special_tokens:
        tokenizer.add_special_tokens({k: v for k, v in special_tokens.items() if v is not None})
    if special_tokens.get("pad_token", "") is None:
        tokenizer.pad_token = None  # the family ships without one
    if template is not None:
        tokenizer.chat_template = template.strip()
    return tokenizer


def trained_runs(tokenizer, example: dict) -> list[str]:
    """The trained tokens as maximal contiguous runs, each decoded with its special tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exactly_the_replies_and_their_end_of_turn_token_are_trained(tiny_model_dir, family, caplog, tmp_path):
    _, _, end_of_turn, lead = FAMILIES[family]
    tokenizer = build_tokenizer(tiny_model_dir, family)
    with caplog.at_level(logging.WARNING):
        if tokenizer.pad_token is None:  # loaded as the scripts load it, which gives it a pad token
            tokenizer.save_pretrained(tmp_path / family)
            (tmp_path / family / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
            tokenizer = load_tokenizer(str(tmp_path / family))
            assert tokenizer.pad_token == tokenizer.eos_token == end_of_turn  # Llama 3.1: pad = eos = <|eot_id|>
        else:
            prepare_chat_template(tokenizer, f"test/{family}")
    example = tokenize_messages(tokenizer, CONVERSATION)
    assert trained_runs(tokenizer, example) == [f"{lead}{reply}{end_of_turn}" for reply in REPLIES]
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert trained.count(eot_id) == 2 and trained[-1] == eot_id
    # the system prompt, both user turns and every role header stay in the untrained tokens
    untrained = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX])
    for text in (SYSTEM, CONVERSATION[1]["content"], CONVERSATION[3]["content"]):
        assert text in untrained, (family, text)
    bos = tokenizer.bos_token
    if bos and tokenizer.apply_chat_template(CONVERSATION, tokenize=False).startswith(bos):
        assert example["input_ids"][0] == tokenizer.bos_token_id and example["labels"][0] == IGNORE_INDEX
        assert example["input_ids"][1] != tokenizer.bos_token_id  # one BOS, not two
    # padding is never trained, even where the pad id is the end-of-turn id (SmolLM2) or the eos (Llama 3)
    short = tokenize_messages(tokenizer, CONVERSATION[:3])
    batch = collate_batch([example, short], tokenizer.pad_token_id, pad_to_multiple_of=8)
    n = len(short["input_ids"])
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all() and (batch["labels"][1, :n] == eot_id).sum() == 1


class ScriptedTokens(LogitsProcessor):
    """Forces the model to emit `script` one token per step (then repeats its last token)."""

    def __init__(self, script: list[int], prompt_length: int):
        self.script, self.prompt_length = script, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = self.script[min(input_ids.shape[1] - self.prompt_length, len(self.script) - 1)]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_stops_at_the_family_end_of_turn_token(tiny_model_dir, family):
    _, _, end_of_turn, _ = FAMILIES[family]
    tokenizer = build_tokenizer(tiny_model_dir, family)
    prepare_chat_template(tokenizer, f"test/{family}")
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    stop_ids = end_of_turn_ids(tokenizer)
    expected = [eot_id] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id != eot_id else [])
    assert stop_ids == expected  # e.g. Llama 3: [<|eot_id|>, <|end_of_text|>]; Gemma: [<end_of_turn>, <eos>]
    generation_config = build_generation_config(tokenizer)  # what export.py writes
    assert generation_config.eos_token_id == (expected[0] if len(expected) == 1 else expected)

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    text = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    word_a, word_b = tokenizer.convert_tokens_to_ids(["Rule", "Ġapplies"])
    header = next(i for i in tokenizer.all_special_ids if i not in stop_ids)  # a special token that is no stop

    def generate(script: list[int]) -> list[int]:
        generation_config.max_new_tokens, generation_config.do_sample = 6, False
        output = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                generation_config=generation_config,
                                logits_processor=[ScriptedTokens(script, prompt.shape[1])])  # fmt: skip
        return output[0, prompt.shape[1] :].tolist()

    assert generate([word_a, word_b, eot_id, word_a]) == [word_a, word_b, eot_id]  # stops right after it
    assert len(generate([word_a, header, word_b])) == 6  # another special token does not stop it


def test_llama3_dated_system_header_is_never_trained(tiny_model_dir):
    tokenizer = build_tokenizer(tiny_model_dir, "llama3")
    prepare_chat_template(tokenizer, "meta-llama/Llama-3.2-1B-Instruct")
    before = time.strftime("%d %b %Y")
    example = tokenize_messages(tokenizer, CONVERSATION)
    dates = {before, time.strftime("%d %b %Y")}  # the template reads the clock: midnight may pass in between
    text = tokenizer.decode(example["input_ids"])
    assert any(f"Today Date: {date}" in text for date in dates) and "Cutting Knowledge Date" in text
    assert "Today Date" not in "".join(trained_runs(tokenizer, example))


def test_no_system_role_merges_the_system_prompt_into_the_first_user_turn(tiny_model_dir, caplog):
    for family, name in (("gemma", "google/gemma-2-2b-it"), ("mistral-v0.3", "mistralai/Mistral-7B-Instruct-v0.3")):
        tokenizer = build_tokenizer(tiny_model_dir, family)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            prepare_chat_template(tokenizer, name)
            prepare_chat_template(tokenizer, name)  # idempotent: the merged template has a system role
        merges = [r.getMessage() for r in caplog.records if "no system role" in r.getMessage()]
        assert merges == [
            f"warning: the chat template of {name} has no system role; the system message is merged into the "
            "first user turn"
        ]
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        assert f"{SYSTEM}\n\n{CONVERSATION[1]['content']}" in text, family  # the first user turn opens with it
        assert text.count(SYSTEM) == 1
        # the prompt generation sees carries the system prompt the same way
        prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
        assert text.startswith(prompt)


def test_not_prefix_stable_template_is_refused_naming_the_model(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = QWEN3_LIKE.strip()
    with pytest.raises(ModelLoadError) as excinfo:
        prepare_chat_template(tokenizer, "Qwen/Qwen3-0.6B")
    message = str(excinfo.value)
    assert message.startswith("the chat template of Qwen/Qwen3-0.6B is not prefix-stable: it renders earlier turns")
    assert (
        message.endswith("pass --chat-template FILE with a Jinja chat template that does not") and "\n" not in message
    )
    # tokenize_records says the same for a record, naming its line
    with pytest.raises(DataError, match=r"record at line 7: the chat template of .* is not prefix-stable"):
        tokenize_records([{"messages": CONVERSATION, "_line": 7}], tokenizer, 512)


def test_missing_template_and_a_template_without_end_of_turn_are_refused(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(ModelLoadError) as excinfo:
        prepare_chat_template(tokenizer, "gpt2")
    assert str(excinfo.value) == (
        "the tokenizer of gpt2 has no chat template; pass --chat-template FILE (a Jinja chat template, e.g. copied "
        "from the instruct version's tokenizer_config.json) or use an instruct/chat model"
    )
    # a base-model style template: nothing special closes a reply, so the model would never stop
    tokenizer.chat_template = "{% for m in messages %}### {{ m.role }}:\n{{ m.content }}\n\n{% endfor %}"
    with pytest.raises(ModelLoadError, match=r"not with a special end-of-turn token.*pass --chat-template FILE"):
        prepare_chat_template(tokenizer, "base-model")
    # --chat-template FILE replaces it (a .jinja file, or a folder holding chat_template.jinja)
    template_file = tmp_path / "gemma.jinja"
    template_file.write_text(GEMMA.strip())
    gemma = build_tokenizer(tiny_model_dir, "gemma")
    gemma.chat_template = None
    prepare_chat_template(gemma, "my-gemma", chat_template=str(template_file))
    assert gemma.chat_template.endswith(GEMMA.strip())
    assert trained_runs(gemma, tokenize_messages(gemma, CONVERSATION)) == [f"{r}<end_of_turn>" for r in REPLIES]
    with pytest.raises(ModelLoadError, match=r"--chat-template .*missing\.jinja: cannot read it"):
        prepare_chat_template(gemma, "my-gemma", chat_template=str(tmp_path / "missing.jinja"))


def test_double_bos_is_detected_and_avoided(tiny_model_dir):
    tokenizer = build_tokenizer(tiny_model_dir, "llama3")
    tokenizer.add_bos_token = True  # Llama 3's tokenizer adds <|begin_of_text|> by itself, and so does its template
    prepare_chat_template(tokenizer, "meta-llama/Llama-3.1-8B-Instruct")
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    bos = tokenizer.bos_token_id
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]  # the trap: tokenizing the rendered text naively
    example = tokenize_messages(tokenizer, CONVERSATION)
    assert example["input_ids"][0] == bos and example["input_ids"][1] != bos
    # a template that writes BOS twice itself loses one
    tokenizer.chat_template = "{{ bos_token }}" + LLAMA3.strip()
    example = tokenize_messages(tokenizer, CONVERSATION)
    assert example["input_ids"][0] == bos and example["input_ids"][1] != bos
    assert trained_runs(tokenizer, example) == [f"{reply}<|eot_id|>" for reply in REPLIES]


def test_train_py_chat_template_flag_is_used_and_saved(tiny_model_dir, tmp_path):
    """--chat-template FILE in train.py: the run trains with it and saves it next to the adapter."""
    template = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    template += "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    template_file = tmp_path / "plain_chatml.jinja"
    template_file.write_text(template)
    data = write_jsonl(tmp_path / "train.jsonl", [make_conversation(i) for i in range(6)])
    run = tmp_path / "run"
    train.main(["--model", str(tiny_model_dir), "--train-file", str(data), "--output-dir", str(run),
                "--chat-template", str(template_file),
                "--max-steps", "1", "--batch-size", "2", "--effective-batch-size", "2", "--rank", "4",
                "--mixed-precision", "no", "--report-to", "none", "--num-samples", "0", "--no-baseline"])  # fmt: skip
    assert (run / "final" / "chat_template.jinja").read_text() == template
    saved = AutoTokenizer.from_pretrained(run / "final")
    rendered = saved.apply_chat_template(CONVERSATION, tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" not in rendered  # the default's system prompt is gone


def test_conversations_a_template_refuses_name_their_line(tiny_model_dir):
    gemma = build_tokenizer(tiny_model_dir, "gemma")
    prepare_chat_template(gemma, "google/gemma-2-2b-it")
    two_users = [CONVERSATION[1], CONVERSATION[3], CONVERSATION[2]]
    with pytest.raises(DataError, match=r"record at line 3: the chat template of .* refuses this conversation "
                                        r"\(Conversation roles must alternate"):  # fmt: skip
        tokenize_records([{"messages": two_users, "_line": 3}], gemma, 512)
    with pytest.raises(DataError, match=r"record at line 2: the conversation opens with an assistant turn"):
        tokenize_records([{"messages": CONVERSATION[2:], "_line": 2}], build_tokenizer(tiny_model_dir, "smollm2"), 512)


# --- SentencePiece-style tokenizers (Metaspace "▁", special tokens with rstrip/lstrip), built offline ---

NO_SYSTEM_PADDED = [
    {"role": "user", "content": "  Term life, age 42, 500k, non-smoker. "},
    {"role": "assistant", "content": " What is the applicant's BMI?\n"},
    {"role": "user", "content": "27.5\n"},
    {"role": "assistant", "content": "\tStandard class applies.\nDECISION: approve | CLASS: standard | RULES: L-8  "},
]
# family -> template, special tokens as the real tokenizer configs declare them (rstrip on Phi-3's role tokens),
# whether the tokenizer adds BOS itself, end-of-turn token, whether the template trims the replies
SENTENCEPIECE_FAMILIES = {
    "mistral-v0.3": (MISTRAL_V03, {"[INST]": {}, "[/INST]": {}}, "</s>", True),
    "phi3": (PHI3, {"<|user|>": {"rstrip": True}, "<|assistant|>": {"rstrip": True}, "<|system|>": {"rstrip": True},
                    "<|end|>": {"rstrip": True}, "<|endoftext|>": {}}, "<|end|>", False),
    "gemma": (GEMMA, {"<start_of_turn>": {}, "<end_of_turn>": {}, "<pad>": {}}, "<end_of_turn>", True),
}  # fmt: skip


def build_sentencepiece_tokenizer(family: str):
    """A small BPE with a Metaspace pre-tokenizer (as Mistral/Phi-3/Gemma convert), trained here, adding BOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    template, added, _, _ = SENTENCEPIECE_FAMILIES[family]
    eos = "<eos>" if family == "gemma" else ("<|endoftext|>" if family == "phi3" else "</s>")
    bos = "<bos>" if family == "gemma" else "<s>"
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = [m["content"] for m in CONVERSATION + NO_SYSTEM_PADDED] * 3 + [SYSTEM]
    model.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", bos, "</s>", eos]))
    model.add_special_tokens([AddedToken(t, special=True, normalized=False, **o) for t, o in added.items()])
    # like the real configs, the tokenizer itself puts BOS first (add_special_tokens=True)
    model.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, model.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=bos, eos_token=eos, unk_token="<unk>")
    tokenizer.pad_token = "<pad>" if family == "gemma" else eos
    tokenizer.chat_template = template.strip()
    return tokenizer


@pytest.mark.parametrize("family", list(SENTENCEPIECE_FAMILIES))
@pytest.mark.parametrize("conversation", ["with_system", "no_system_whitespace"])
def test_sentencepiece_style_tokenizers_train_exactly_the_replies(family, conversation):
    """On "▁"-tokens, rstrip specials and a tokenizer that adds BOS itself: BOS only as the template writes it
    (once), and the trained tokens
    are each reply (trimmed where the template trims) and its end-of-turn token, nothing of the user turns"""
    _, _, end_of_turn, trims = SENTENCEPIECE_FAMILIES[family]
    messages = CONVERSATION if conversation == "with_system" else NO_SYSTEM_PADDED
    tokenizer = build_sentencepiece_tokenizer(family)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer adds BOS itself
    prepare_chat_template(tokenizer, f"test/{family}")
    example = tokenize_messages(tokenizer, messages)
    if tokenizer.apply_chat_template(messages, tokenize=False).startswith(tokenizer.bos_token):
        assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"][1] != tokenizer.bos_token_id
    else:  # Phi-3's template writes no BOS: the tokenizer must not add one either
        assert tokenizer.bos_token_id not in example["input_ids"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [(r.strip() if trims else r) + end_of_turn for r in replies]
    # Metaspace decoding drops the "▁" word marks at a run's start; compare without the outer whitespace
    assert [run.strip() for run in trained_runs(tokenizer, example)] == [e.strip() for e in expected]
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert trained.count(eot_id) == 2 and trained[-1] == eot_id
    untrained = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX])
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"].strip() in untrained, (family, message["content"])
