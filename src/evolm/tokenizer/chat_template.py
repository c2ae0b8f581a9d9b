"""Chat templates: the Jinja2 programs checkpoints ship to turn a conversation into a prompt.

Rendered the way ``transformers``' ``apply_chat_template`` does: a sandboxed, immutable Jinja2
environment with ``trim_blocks`` and ``lstrip_blocks``, loop controls, a ``tojson`` filter that does
not HTML-escape, and the globals ``raise_exception``, ``strftime_now`` and ``namespace``. Templates
come from downloaded files and are untrusted code, hence the sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from evolm.errors import ConfigError


class _Generation(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (marks assistant text) and renders its body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no reaching into interpreter internals)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r} on a namespace")
        super().__setitem__(name, value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"the chat template does not parse (line {e.lineno}): {e.message}") from e


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    special_tokens: dict[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with a Jinja2 chat template.

    Args:
        template: The template source.
        messages: ``[{"role": "user", "content": "..."}, ...]``.
        add_generation_prompt: Append the header that starts the assistant's turn.
        tools: Tool (function) schemas for templates that support them.
        documents: Retrieved documents for templates that support them.
        special_tokens: ``bos_token``, ``eos_token``, ... strings the template may use.
        **kwargs: Extra template variables (e.g. ``enable_thinking``).

    Returns:
        The prompt text.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ConfigError(f"messages[{i}] must be a dict with a 'role' (and usually 'content'); got {m!r}")
    variables = dict(special_tokens or {})
    variables.update(kwargs)
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ConfigError(f"the chat template rejected the conversation: {e}") from e
