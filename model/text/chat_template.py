"""Render a Jinja chat template as transformers' `apply_chat_template(..., tokenize=False)` does.

Same sandboxed environment and helpers as transformers (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`strftime_now`, a `tojson` that does not escape HTML), same variables (`messages`, `tools`, `documents`,
`add_generation_prompt`, the special tokens, extra keyword arguments), so a checkpoint's template renders identically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Fallback for Llama 3 checkpoints without a template: the Llama 3 Instruct turn format, BOS first.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates (and transformers) want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class ChatTemplate:
    """A compiled chat template: compile once per checkpoint, render per request."""

    def __init__(self, source: str):
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                    extensions=[_GenerationBlock, loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        environment.globals["strftime_now"] = _strftime_now
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"chat template does not compile: {err.message} (line {err.lineno})") from err
        self.source = source

    def render(self, messages: Iterable[Mapping], *, bos_token: str | None = None, eos_token: str | None = None,
               add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **kwargs) -> str:
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ValueError(f"chat messages must be mappings, got {type(message).__name__}")
            # As transformers does: drop None fields (OpenAI sends content=None beside tool_calls), since
            # templates test whether a key is present.
            chat.append({key: value for key, value in message.items() if value is not None})
        # A missing special token stays undefined (renders empty), as in transformers, rather than the text "None".
        tokens = {key: value for key, value in (("bos_token", bos_token), ("eos_token", eos_token))
                  if value is not None}
        try:
            return self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **tokens, **kwargs)
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template failed: {err}") from err
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as err:
            raise ValueError(f"chat template failed: {type(err).__name__}: {err}") from err


def render_chat(template: str | None, messages: Iterable[Mapping], *, bos_token: str | None,
                eos_token: str | None, add_generation_prompt: bool = True, **kwargs) -> str:
    """Render `messages` with `template`, or with the Llama 3 fallback when the checkpoint has none."""
    return ChatTemplate(template or LLAMA3_CHAT_TEMPLATE).render(
        messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt, **kwargs)
