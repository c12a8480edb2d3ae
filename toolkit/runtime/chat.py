"""A chat model's conversation as its prompt: the chat template the model was trained with (kept in
the bundle at export, from its tokenizer's config) rendered as transformers renders it
(`apply_chat_template`), without transformers or torch: Jinja in an immutable sandbox, blocks
trimmed, loop controls, transformers' `tojson`, `raise_exception` and `strftime_now`."""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from toolkit.errors import ToolkitError

__all__ = ["render_chat"]


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                special_tokens: Mapping[str, str] | None = None) -> str:
    """The prompt for `messages` ({"role", "content"} each); `special_tokens` (bos_token,
    eos_token, ...) are the template's variables of those names. A template that refuses the
    conversation (raise_exception: roles out of order, an unknown role) raises ToolkitError."""
    from jinja2.exceptions import TemplateError

    try:
        return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **(special_tokens or {}))
    except TemplateError as exc:
        raise ToolkitError(f"the model's chat template refuses these messages: {exc}") from None


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ToolkitError("chat templates need jinja2: pip install 'toolkit[serve]'.") from None
    from jinja2.exceptions import TemplateError

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(template)
    except TemplateError as exc:
        raise ToolkitError(f"the model's chat template is not valid Jinja: {exc}") from None
