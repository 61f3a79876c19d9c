"""Instruction and chat records for ``kimi-linear prepare --format ...``, with the loss masked to
the responses.

Record forms (one JSON object per JSONL line, or one parquet row):

* ``prompt_completion``: ``{"prompt": str, "completion": str}``; the prompt and the completion
  are joined as they are (no template).
* ``alpaca``: ``{"instruction": str, "input": str (optional, may be empty), "output": str}``,
  rendered with the Stanford Alpaca prompt (:data:`ALPACA_PROMPT`, :data:`ALPACA_PROMPT_NO_INPUT`).
* ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``
  with at least one non-empty assistant message, rendered with the tokenizer's own chat
  template when it has one (a Hugging Face tokenizer folder with ``chat_template``), else with
  the built-in template :data:`BUILTIN_CHAT_TEMPLATE`.
* ``auto`` picks the form of each record from its keys (``messages``; ``instruction`` +
  ``output``; ``prompt`` + ``completion``; else the ``--text_field`` of a plain text record,
  trained on whole).

Every rendered example is a list of :data:`Segment` ``(text, in_loss)``; ``text=None`` stands
for the tokenizer's EOS token.  Only the responses (the completion, the Alpaca output, every
assistant message's content) and the EOS that ends each of them are ``in_loss``; the prompt,
the template's tags and the system / user messages are not (their labels become ``-100`` in
training).  Segments are tokenised one by one, so the boundary between prompt and response is
exact at token level (``kimi_linear.lightning.data.preparation``).

Built-in chat template (``<eos>`` is the tokenizer's EOS token; the loss covers ``{content}<eos>``
of each assistant message)::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}<eos>...

To prompt a model fine-tuned on it, end the prompt with ``<|assistant|>\\n`` and stop at EOS.

With a tokenizer chat template, each assistant message's span is found by rendering the
conversation up to it twice: ``messages[:i]`` with ``add_generation_prompt=True`` (the prompt)
and ``messages[:i + 1]`` (the prompt and the reply); the difference is the reply, in the loss,
template end-of-turn tokens included.  A template whose rendering of a prefix is not a prefix
of the longer one cannot be split this way and is an error.  The example then ends with EOS (in
the loss when the last message is the assistant's).

This module imports neither torch nor Lightning (it runs in ``prepare``'s workers).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kimi_linear.errors import UsageError, did_you_mean

#: ``--format`` values: ``text`` (a text field, every token in the loss), ``auto`` (per record),
#: and the instruction forms
RECORD_FORMATS = ("text", "auto", "prompt_completion", "alpaca", "chat")
INSTRUCTION_FORMATS = ("prompt_completion", "alpaca", "chat")
#: ``--chat_template`` values
CHAT_TEMPLATES = ("auto", "builtin", "tokenizer")
#: roles a chat message may have
ROLES = ("system", "user", "assistant")

#: a piece of a rendered example: ``(text, in_loss)``; ``text=None`` is the EOS token
Segment = tuple[str | None, bool]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
#: the built-in chat template: the tag that opens each role's message (see the module docstring)
BUILTIN_CHAT_TEMPLATE = {
    "system": "<|system|>\n",
    "user": "<|user|>\n",
    "assistant": "<|assistant|>\n",
}


@dataclass(frozen=True)
class Example:
    """One parsed record.

    Attributes:
        kind: ``"text"`` or one of :data:`INSTRUCTION_FORMATS`.
        fields: ``text`` -> ``(text,)``; ``prompt_completion`` -> ``(prompt, completion)``;
            ``alpaca`` -> ``(instruction, input, output)``; ``chat`` -> ``((role, content), ...)``.
    """

    kind: str
    fields: tuple[Any, ...]

    @property
    def key_text(self) -> str:
        """The string whose hash decides the example's split: the text itself for plain text,
        else a canonical JSON of the kind and fields (equal records, equal keys)."""
        if self.kind == "text":
            return self.fields[0]
        return json.dumps([self.kind, self.fields], ensure_ascii=False, separators=(",", ":"))

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the record's strings (for the summary)."""
        return len("".join(_strings(self.fields)).encode("utf-8"))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    for v in value:
        out.extend(_strings(v))
    return out


def check_record_format(record_format: str, chat_template: str = "auto") -> None:
    """:class:`UsageError` naming ``--format`` / ``--chat_template`` for unknown values."""
    if record_format not in RECORD_FORMATS:
        raise UsageError(
            f"--format must be one of {list(RECORD_FORMATS)}, got {record_format!r}"
            f"{did_you_mean(record_format, RECORD_FORMATS)}"
        )
    if chat_template not in CHAT_TEMPLATES:
        raise UsageError(
            f"--chat_template must be one of {list(CHAT_TEMPLATES)}, got {chat_template!r}"
            f"{did_you_mean(chat_template, CHAT_TEMPLATES)}"
        )


def detect_format(record: Mapping[str, Any], text_field: str = "text") -> str | None:
    """The form of ``record`` by its keys (``chat``, ``alpaca``, ``prompt_completion``,
    ``text``), or ``None`` when it has none of them."""
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if text_field in record:
        return "text"
    return None


def parse_record(
    record: Mapping[str, Any], record_format: str, text_field: str = "text"
) -> Example | None:
    """``record`` as an :class:`Example` of ``record_format`` (``auto``: detected), or ``None``
    when it does not fit that form (a field missing or not a string, an unknown role, no
    non-empty response).  An empty plain text gives ``Example("text", ("",))`` (the caller
    counts it as empty)."""
    kind = detect_format(record, text_field) if record_format == "auto" else record_format
    if kind is None:
        return None
    if kind == "text":
        text = record.get(text_field)
        return Example("text", (text,)) if isinstance(text, str) else None
    if kind == "prompt_completion":
        prompt, completion = record.get("prompt"), record.get("completion")
        if not (isinstance(prompt, str) and isinstance(completion, str) and completion):
            return None
        return Example(kind, (prompt, completion))
    if kind == "alpaca":
        instruction, output = record.get("instruction"), record.get("output")
        inp = record.get("input", "")
        inp = "" if inp is None else inp
        if not (isinstance(instruction, str) and isinstance(inp, str) and isinstance(output, str)):
            return None
        if not output:
            return None
        return Example(kind, (instruction, inp, output))
    if kind == "chat":
        messages = record.get("messages")
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            return None
        parsed = []
        for m in messages:
            if not isinstance(m, Mapping):
                return None
            role, content = m.get("role"), m.get("content")
            if role not in ROLES or not isinstance(content, str):
                return None
            parsed.append((role, content))
        if not any(role == "assistant" and content for role, content in parsed):
            return None
        return Example(kind, tuple(parsed))
    raise ValueError(f"unknown record format {kind!r}")


class ChatRenderer:
    """Renders :class:`Example` s into :data:`Segment` lists.

    Args:
        template: ``"builtin"`` (:data:`BUILTIN_CHAT_TEMPLATE`) or ``"tokenizer"`` (the chat
            template of ``hf_tokenizer``).
        hf_tokenizer: a ``transformers`` tokenizer with ``chat_template`` (for ``"tokenizer"``).
    """

    def __init__(self, template: str = "builtin", hf_tokenizer: Any = None) -> None:
        if template not in ("builtin", "tokenizer"):
            raise ValueError(f"template must be 'builtin' or 'tokenizer', got {template!r}")
        if template == "tokenizer" and not getattr(hf_tokenizer, "chat_template", None):
            raise UsageError("--chat_template tokenizer: the tokenizer has no chat template")
        self.template, self.hf_tokenizer = template, hf_tokenizer

    def render(self, example: Example) -> list[Segment]:
        """The segments of ``example``; plain text is one segment in the loss, then EOS."""
        kind, f = example.kind, example.fields
        if kind == "text":
            return [(f[0], True), (None, True)]
        if kind == "prompt_completion":
            return [(f[0], False), (f[1], True), (None, True)]
        if kind == "alpaca":
            instruction, inp, output = f
            if inp:
                prompt = ALPACA_PROMPT.format(instruction=instruction, input=inp)
            else:
                prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
            return [(prompt, False), (output, True), (None, True)]
        if kind == "chat":
            if self.template == "tokenizer":
                return self._render_with_tokenizer(list(f))
            segments: list[Segment] = []
            for role, content in f:
                if role == "assistant":
                    segments += [(BUILTIN_CHAT_TEMPLATE[role], False), (content, True)]
                    segments.append((None, True))
                else:
                    segments.append((BUILTIN_CHAT_TEMPLATE[role] + content + "\n", False))
            if f[-1][0] != "assistant":
                segments.append((None, False))
            return segments
        raise ValueError(f"unknown example kind {kind!r}")

    def _render_with_tokenizer(self, messages: list[tuple[str, str]]) -> list[Segment]:
        tok = self.hf_tokenizer
        dicts = [{"role": r, "content": c} for r, c in messages]

        def render(upto: int, generation_prompt: bool) -> str:
            return tok.apply_chat_template(
                dicts[:upto], tokenize=False, add_generation_prompt=generation_prompt
            )

        segments: list[Segment] = []
        done = ""  # the rendered text covered by the segments so far
        for i, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            prompt, full = render(i, True), render(i + 1, False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise UsageError(
                    "--chat_template tokenizer: the tokenizer's chat template does not render a "
                    "conversation's prefix as a prefix of the whole, so the replies cannot be "
                    "masked; use --chat_template builtin"
                )
            if len(prompt) > len(done):
                segments.append((prompt[len(done) :], False))
            segments.append((full[len(prompt) :], True))
            done = full
        whole = render(len(messages), False)
        if not whole.startswith(done):
            raise UsageError(
                "--chat_template tokenizer: the tokenizer's chat template does not render a "
                "conversation's prefix as a prefix of the whole; use --chat_template builtin"
            )
        if len(whole) > len(done):
            segments.append((whole[len(done) :], False))
        segments.append((None, messages[-1][0] == "assistant"))
        return segments


def hf_chat_tokenizer(tokenizer: Any) -> Any:
    """The ``transformers`` tokenizer inside ``tokenizer`` when it has a chat template, else
    ``None`` (the byte, ``tokenizer.json`` and tiktoken tokenizers have none)."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None and getattr(inner, "chat_template", None):
        return inner
    return None


def make_renderer(chat_template: str, tokenizer: Any = None) -> ChatRenderer:
    """The :class:`ChatRenderer` for ``--chat_template`` (``auto``: the tokenizer's template
    when ``tokenizer`` has one, else the built-in)."""
    check_record_format("text", chat_template)
    hf = hf_chat_tokenizer(tokenizer) if tokenizer is not None else None
    if chat_template == "builtin" or (chat_template == "auto" and hf is None):
        return ChatRenderer("builtin")
    if hf is None:
        raise UsageError(
            "--chat_template tokenizer: the tokenizer has no chat template (only a Hugging Face "
            "tokenizer folder with a chat_template has one); use --chat_template builtin"
        )
    return ChatRenderer("tokenizer", hf)


def encode_segments(
    segments: Sequence[Segment], encode: Any, eos_id: int
) -> tuple[list[int], list[bool]]:
    """Token ids and per-token loss flags of ``segments``, each segment tokenised alone by
    ``encode(text) -> list[int]`` (``None`` -> ``eos_id``)."""
    ids: list[int] = []
    mask: list[bool] = []
    for text, in_loss in segments:
        piece = [eos_id] if text is None else list(encode(text))
        ids.extend(piece)
        mask.extend([in_loss] * len(piece))
    return ids, mask


__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "BUILTIN_CHAT_TEMPLATE",
    "CHAT_TEMPLATES",
    "ChatRenderer",
    "Example",
    "INSTRUCTION_FORMATS",
    "RECORD_FORMATS",
    "ROLES",
    "Segment",
    "check_record_format",
    "detect_format",
    "encode_segments",
    "hf_chat_tokenizer",
    "make_renderer",
    "parse_record",
]
