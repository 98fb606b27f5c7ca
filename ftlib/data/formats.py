"""Prompt templates, and turning one raw row into text plus the character spans that are trained.

Three row formats (`data.sources[].format`):

  alpaca      {"instruction": str, "input": str (optional), "output": str}, rendered with the course notebook's
              templates, word for word (style `instruct` or `chat`, `data.prompt_style`). The prompt is everything
              before the output; the output (and the end-of-sequence token) is trained.
  messages    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}, rendered with a Jinja chat
              template: `data.chat_template` if set, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE below.
              Only the assistant turns are trained (their content and the template's end-of-turn marker).
  completion  {"text": str}: raw text, all trained.

Serving formats a bare instruction with `alpaca_prompt()`, so generation sees exactly the training prompt.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Tuple, Union

from ftlib.data import DataError

# The notebook's AlpacaPrompter, text for text.
SYSTEM_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n")
SYSTEM_NO_INPUT_PROMPT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n")
TEMPLATES = {
    "instruct": {
        "input": SYSTEM_PROMPT + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "no_input": SYSTEM_NO_INPUT_PROMPT + "### Instruction:\n{instruction}\n\n### Response:\n",
    },
    "chat": {
        "input": SYSTEM_PROMPT + "USER: {instruction}\n{input}\nASSISTANT:",
        "no_input": SYSTEM_NO_INPUT_PROMPT + "USER: {instruction}\nASSISTANT:",
    },
}

# For `messages` rows when neither the recipe nor the tokenizer has a chat template: the notebook's USER:/ASSISTANT:
# turns. Each assistant turn ends with the EOS token, so the model learns to stop; the generation prompt is
# "ASSISTANT:" as in the notebook's chat style.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Why a row is skipped, as manifest keys and as words for messages. The first four are malformed input and count
# towards data.max_bad_fraction; too_long is the data.too_long policy at work.
REASONS = {
    "invalid_json": "invalid JSON",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "empty_output": "empty output",
    "too_long": "too long",
}
MALFORMED = ("invalid_json", "missing_field", "wrong_type", "empty_output")


class BadRow(Exception):
    """A row that cannot become an example; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------------- alpaca
def alpaca_prompt(instruction: str, input: str = "", style: str = "instruct") -> str:  # noqa: A002 (notebook name)
    """The notebook's prompt for an instruction (and optional input), ending where the response begins."""
    if style not in TEMPLATES:
        raise ValueError(f"prompt style {style!r} is not one of {', '.join(TEMPLATES)}")
    # str.replace rather than str.format: user text may contain braces.
    if input:
        return TEMPLATES[style]["input"].replace("{instruction}", instruction).replace("{input}", input)
    return TEMPLATES[style]["no_input"].replace("{instruction}", instruction)


def build_prompt(row_or_instruction: Union[str, Mapping[str, Any]], style: str = "instruct") -> str:
    """alpaca_prompt for a bare instruction string or for a row with `instruction` and optional `input`."""
    if isinstance(row_or_instruction, str):
        return alpaca_prompt(row_or_instruction, "", style)
    return alpaca_prompt(row_or_instruction["instruction"], row_or_instruction.get("input") or "", style)


def alpaca_example(row: Any, style: str, fields: Mapping[str, str] = {}) -> Tuple[str, int]:
    """(prompt + output, length of the prompt in characters): the characters from there on are trained."""
    instruction = _field(row, "instruction", fields)
    input_ = _field(row, "input", fields, required=False) or ""
    output = _field(row, "output", fields)
    if not output.strip():
        raise BadRow("empty_output", f"field {fields.get('output', 'output')!r} is empty")
    prompt = alpaca_prompt(instruction, input_, style)
    return prompt + output, len(prompt)


# ----------------------------------------------------------------------------------------------------- completion
def completion_example(row: Any, fields: Mapping[str, str] = {}) -> str:
    text = _field(row, "text", fields)
    if not text.strip():
        raise BadRow("empty_output", f"field {fields.get('text', 'text')!r} is empty")
    return text


# ----------------------------------------------------------------------------------------------------- messages
Render = Callable[[List[Dict[str, str]], bool], str]  # (turns, add_generation_prompt) -> text


def chat_renderer(tokenizer, template: str | None) -> Render:
    """Render turns with `template`, else the tokenizer's chat template, else DEFAULT_CHAT_TEMPLATE."""
    chosen = template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    def render(turns, add_generation_prompt):
        return tokenizer.apply_chat_template(turns, chat_template=chosen, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    return render


def messages_example(row: Any, render: Render, fields: Mapping[str, str] = {}) -> Tuple[str, List[Tuple[int, int]]]:
    """(the rendered conversation, character spans of the assistant turns).

    An assistant turn's span is what rendering it adds after the generation prompt of the turns before it (its
    content and end-of-turn marker), without trailing whitespace. That needs a template whose rendering of the first
    k turns is a prefix of the rendering of all turns; templates that rewrite earlier turns are rejected."""
    name = fields.get("messages", "messages")
    turns = _field(row, "messages", fields, kind=list)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRow("wrong_type", f"{name}[{i}] is {_type(turn)}, expected an object with role and content")
        for key in ("role", "content"):
            if turn.get(key) is None:
                raise BadRow("missing_field", f"{name}[{i}] has no {key!r}")
            if not isinstance(turn[key], str):
                raise BadRow("wrong_type", f"{name}[{i}].{key} is {_type(turn[key])}, expected a string")
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise BadRow("empty_output", f"{name} has no assistant turn with content")
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    try:
        text = render(turns, False)
        spans = []
        for k, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            before = render(turns[:k], True)
            upto = render(turns[: k + 1], False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError("the chat template renders earlier turns differently once later turns follow, so "
                                "assistant turns cannot be located; set data.chat_template to a template that only "
                                "appends (see ftlib.data.formats.DEFAULT_CHAT_TEMPLATE)")
            spans.append((len(before), len(upto.rstrip())))
    except DataError:
        raise
    except Exception as e:  # the template raised, e.g. "roles must alternate user/assistant"
        raise BadRow("wrong_type", f"chat template: {' '.join(str(e).split())}") from None
    return text, spans


# ----------------------------------------------------------------------------------------------------- fields
def _field(row: Any, name: str, fields: Mapping[str, str], required: bool = True, kind: type = str):
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"a row must be a JSON object, got {_type(row)}")
    key = fields.get(name, name)
    value = row.get(key)
    if value is None:
        if required:
            raise BadRow("missing_field", f"missing field {key!r}")
        return None
    if not isinstance(value, kind):
        raise BadRow("wrong_type", f"field {key!r} is {_type(value)}, expected {'a string' if kind is str else 'a list'}")
    return value


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
