"""An Ollama Modelfile for an exported GGUF, with a Go TEMPLATE derived from the Jinja chat template.

    from common.modelfile import build_ollama_template, build_modelfile, render_go_template

Ollama does not run Jinja: a GGUF imported without a TEMPLATE gets a generic one, and the model then
answers garbage or never stops. So the template is rebuilt here in Ollama's Go-template dialect from
the chat template itself: the Jinja template is rendered on marker messages and cut into the text
around each role's content (`derive_template_parts`). That works for templates that wrap every
message the same way (ChatML as in SmolLM2/Qwen, Llama 3, Gemma, Phi-3); anything else is refused.

The TEMPLATE follows Ollama's own templates: `.System` holds the system messages (Ollama collects
them, and inserts the Modelfile's SYSTEM when a request has none), `.Messages` every message (its
system messages skipped in the loop). `render_go_template` interprets the few Go-template actions
used here, written from Go's text/template rules, so the TEMPLATE can be checked against
`apply_chat_template` without an Ollama server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

# Marker contents: rendered through the Jinja template, then located to cut it into parts.
MARKERS = {"system": "SYSTEMMARKER7f3a", "user": "USERMARKER7f3a", "assistant": "ASSISTANTMARKER7f3a"}
# Checked besides the validation prompts: a conversation without system turn, with an earlier reply.
MULTI_TURN_CHECK = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello.\nWhat can I do for you?"},
    {"role": "user", "content": "Applicant is 61, smoker, wants 1M term life."},
]
GO_ACTION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)


class TemplateError(ValueError):
    """The chat template cannot be written as an Ollama TEMPLATE, or a Go template cannot be rendered."""


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _cut(text: str, prefix: str = "", suffix: str = "", what: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(prefix) + len(suffix) > len(text):
        raise TemplateError(f"the chat template does not wrap every message the same way ({what})")
    return text[len(prefix) : len(text) - len(suffix)]


def added_bos(tokenizer) -> str:
    """The BOS token text when the tokenizer (and so llama.cpp) prepends it by itself, else "".

    A template that also writes it would double it; the TEMPLATE leaves it to the runtime.
    """
    bos_id = tokenizer.bos_token_id
    adds = bos_id is not None and tokenizer("a")["input_ids"][:1] == [bos_id]
    return tokenizer.bos_token if adds else ""


def strip_added_bos(tokenizer, text: str) -> str:
    """`text` without the BOS that the runtime adds (see `added_bos`)."""
    bos = added_bos(tokenizer)
    return text[len(bos) :] if bos and text.startswith(bos) else text


def derive_template_parts(tokenizer) -> dict[str, str]:
    """Cut the Jinja chat template into the literal text around each role's content.

    Args:
        tokenizer: a tokenizer with a chat template that accepts system/user/assistant messages.

    Returns:
        {"system_open", "system_close", "default_system", "user_open", "user_close", "assistant_open",
        "assistant_close", "generation_prompt"}; "default_system" is the block the template inserts when
        a conversation has no system message ("" if none). A BOS token the tokenizer adds by itself
        is left out (llama.cpp adds it too; see `added_bos`).

    Raises:
        TemplateError: the template renders messages in a way these parts cannot reproduce.
    """
    s, u, a = MARKERS["system"], MARKERS["user"], MARKERS["assistant"]
    conversation = [{"role": "system", "content": s}]
    for _ in range(2):
        conversation += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    pieces = re.split(f"({s}|{u}|{a})", _render(tokenizer, conversation, False))
    if pieces[1::2] != [s, u, a, u, a]:
        raise TemplateError("the chat template drops or reorders message contents")
    head, after_system, after_user, after_assistant, _, tail = pieces[0::2]
    head = strip_added_bos(tokenizer, head)
    parts = {"system_open": head, "assistant_close": tail}
    parts["user_open"] = _cut(after_assistant, tail, "", "assistant close")
    parts["system_close"] = _cut(after_system, "", parts["user_open"], "system close")
    first_user = _render(tokenizer, conversation[:2], False)
    parts["user_close"] = first_user.split(u, 1)[1]
    parts["assistant_open"] = _cut(after_user, parts["user_close"], "", "user close")
    with_prompt = _render(tokenizer, conversation[:2], True)
    parts["generation_prompt"] = _cut(with_prompt, first_user, "", "generation prompt")
    no_system = strip_added_bos(tokenizer, _render(tokenizer, [{"role": "user", "content": u}], False))
    parts["default_system"] = _cut(no_system, "", parts["user_open"] + u + parts["user_close"], "default system")
    if any("{{" in part or "}}" in part or '"""' in part for part in parts.values()):
        raise TemplateError('the chat template\'s literal text holds "{{", "}}" or """ (not escaped here)')
    return parts


def build_ollama_template(parts: Mapping[str, str]) -> str:
    """The Go TEMPLATE for Ollama from `derive_template_parts`' output.

    No trim markers (`{{-`) are used: they would also eat the newlines that belong to the chat format.

    Args:
        parts: the literal pieces of the chat template.

    Returns:
        The template text.
    """
    system = f"{{{{ if .System }}}}{parts['system_open']}{{{{ .System }}}}{parts['system_close']}"
    system += f"{{{{ else }}}}{parts['default_system']}{{{{ end }}}}" if parts["default_system"] else "{{ end }}"
    turns = (
        '{{ range .Messages }}{{ if eq .Role "user" }}'
        f"{parts['user_open']}{{{{ .Content }}}}{parts['user_close']}"
        '{{ else if eq .Role "assistant" }}'
        f"{parts['assistant_open']}{{{{ .Content }}}}{parts['assistant_close']}"
        "{{ end }}{{ end }}"
    )
    return system + turns + parts["generation_prompt"]


def training_system_prompt(train_file: str | None) -> str | None:
    """The system prompt most training conversations start with (the Modelfile's SYSTEM), or None."""
    from common.data import DataError, load_records

    path = Path(train_file or "")
    try:
        records = load_records(path) if train_file and path.is_file() else []
    except DataError:
        return None
    first = [r["messages"][0] for r in records if r.get("messages")]
    systems = [m["content"] for m in first if m.get("role") == "system"]
    return max(set(systems), key=systems.count) if systems else None


def build_modelfile(gguf_name: str, tokenizer, eos_ids: Sequence[int], system: str | None) -> str:
    """The Ollama Modelfile: FROM the GGUF next to it, TEMPLATE, one `PARAMETER stop` per end token, SYSTEM.

    Args:
        gguf_name: the GGUF file's name (the Modelfile sits in the same folder).
        tokenizer: the export's tokenizer (its chat template becomes the TEMPLATE).
        eos_ids: generation_config.json's end ids (each becomes a stop string).
        system: the training data's system prompt, or None.

    Returns:
        The Modelfile text.

    Raises:
        TemplateError: the chat template cannot be written as a Go TEMPLATE.
    """
    template = build_ollama_template(derive_template_parts(tokenizer))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{token}"' for token in tokenizer.convert_ids_to_tokens(list(eos_ids))]
    if system:
        if '"""' in system:
            raise TemplateError('the system prompt holds """, which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def read_modelfile_template(modelfile: str) -> str:
    """The TEMPLATE of a Modelfile written by `build_modelfile`."""
    match = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.DOTALL | re.MULTILINE)
    if not match:
        raise TemplateError("the Modelfile has no TEMPLATE")
    return match.group(1)


def ollama_values(messages: Sequence[Mapping[str, str]], modelfile_system: str | None) -> dict:
    """What Ollama passes to the TEMPLATE for a chat request (Modelfile SYSTEM when the request has none)."""
    messages = [dict(m) for m in messages]
    if modelfile_system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": modelfile_system})
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}


def _evaluate(expression: str, dot: Mapping, root: Mapping):
    """A Go template pipeline of the forms `.Field`, `$.Field`, `eq .Field "text"`, `not .Field`."""
    words = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', expression.strip())

    def value(word: str):
        if word.startswith('"'):
            return word[1:-1].encode().decode("unicode_escape")
        if word.startswith("$."):
            return root[word[2:]]
        if word.startswith("."):
            return dot[word[1:]]
        raise TemplateError(f"unsupported Go template operand {word!r}")

    if words[0] == "eq" and len(words) == 3:
        return value(words[1]) == value(words[2])
    if words[0] == "not" and len(words) == 2:
        return not value(words[1])
    if len(words) == 1:
        return value(words[0])
    raise TemplateError(f"unsupported Go template pipeline {expression.strip()!r}")


def _parse(tokens: list[tuple[str, str]], position: int, stops: tuple[str, ...]) -> tuple[list, int]:
    """Nodes until one of `stops` (an action keyword); returns (nodes, index of that stop)."""
    nodes = []
    while position < len(tokens):
        kind, text = tokens[position]
        keyword = text.split()[0] if kind == "action" and text.split() else ""
        if kind == "action" and keyword in stops:
            return nodes, position
        if kind == "text":
            nodes.append(("text", text))
        elif keyword == "if":
            branches, position = _parse_if(tokens, position)
            nodes.append(("if", branches))
        elif keyword == "range":
            body, position = _parse(tokens, position + 1, ("end",))
            nodes.append(("range", text.split(None, 1)[1], body))
        elif keyword in ("else", "end"):
            raise TemplateError(f"unexpected {{{{ {text} }}}}")
        else:
            nodes.append(("print", text))
        position += 1
    if stops:
        raise TemplateError(f"missing {{{{ {stops[-1]} }}}}")
    return nodes, position


def _parse_if(tokens: list[tuple[str, str]], position: int) -> tuple[list, int]:
    """`if A` ... (`else if B` ...)* (`else` ...)? `end`: a list of (condition or None, nodes)."""
    branches, condition = [], tokens[position][1].split(None, 1)[1]
    while True:
        body, position = _parse(tokens, position + 1, ("else", "end"))
        branches.append((condition, body))
        text = tokens[position][1].strip()
        if text == "end":
            return branches, position
        condition = text[len("else if") :] if text.startswith("else if ") else None
        if condition is None:
            body, position = _parse(tokens, position + 1, ("end",))
            return [*branches, (None, body)], position


def _execute(nodes: list, dot: Mapping, root: Mapping) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            out.append(str(_evaluate(node[1], dot, root)))
        elif node[0] == "range":
            out += [_execute(node[2], item, root) for item in _evaluate(node[1], dot, root)]
        else:
            body = next((b for c, b in node[1] if c is None or _evaluate(c, dot, root)), [])
            out.append(_execute(body, dot, root))
    return "".join(out)


def render_go_template(template: str, values: Mapping) -> str:
    """Render the subset of Go's text/template that `build_ollama_template` writes.

    Supported: text, `{{ .X }}`, `{{ if P }}`/`{{ else if P }}`/`{{ else }}`/`{{ end }}`,
    `{{ range .X }}`, with pipelines `.X`, `$.X`, `eq .X "s"`, `not .X`; empty strings and lists are
    false, as in Go. Trim markers (`{{-`) are refused rather than half-supported.

    Args:
        template: the TEMPLATE text.
        values: the top-level data (`ollama_values`).

    Returns:
        The rendered prompt.

    Raises:
        TemplateError: an action outside that subset, or unbalanced if/range/end.
    """
    tokens, last = [], 0
    for match in GO_ACTION.finditer(template):
        if match.group(1).startswith("-") or match.group(1).endswith("-"):
            raise TemplateError("trim markers ({{- or -}}) are not supported by this renderer")
        tokens += [("text", template[last : match.start()]), ("action", match.group(1).strip())]
        last = match.end()
    tokens.append(("text", template[last:]))
    nodes, _ = _parse([t for t in tokens if t != ("text", "")], 0, ())
    return _execute(nodes, values, values)


def check_modelfile(modelfile: str, tokenizer, conversations: Sequence[Sequence[Mapping]], system: str | None) -> dict:
    """Render the Modelfile's TEMPLATE as Ollama would and compare with `apply_chat_template`.

    Each conversation is checked as given and without its system messages (Ollama then inserts the
    Modelfile's SYSTEM, or the template its default system block).

    Args:
        modelfile: the Modelfile text.
        tokenizer: the export's tokenizer.
        conversations: message lists ending with a user turn.
        system: the Modelfile's SYSTEM, or None.

    Returns:
        {"conversations", "mismatches", "passed", "first_mismatch" (only on a mismatch)}.
    """
    template = read_modelfile_template(modelfile)
    result = {"conversations": 0, "mismatches": 0}
    for messages in conversations:
        for variant in (list(messages), [m for m in messages if m["role"] != "system"]):
            values = ollama_values(variant, system)
            with_system = [{"role": m["Role"], "content": m["Content"]} for m in values["Messages"]]
            expected = strip_added_bos(tokenizer, _render(tokenizer, with_system, True))
            rendered = render_go_template(template, values)
            result["conversations"] += 1
            if rendered != expected:
                result["mismatches"] += 1
                result.setdefault("first_mismatch", {"expected": expected, "rendered": rendered})
    result["passed"] = result["mismatches"] == 0
    return result
