"""Text that came from an index (labels, sources, slide names; an index may come from anyone) as it
enters Markdown, HTML or a CSV file: shown literally, never as markup or a spreadsheet formula."""

from __future__ import annotations

import html
import re
from typing import Any

__all__ = ["code_text", "csv_cell", "escape_text"]

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]|~:@]|(?<=www)\.)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def escape_text(text: Any) -> str:
    """Text from an index (a label, a source, a slide name) as it may enter Markdown or HTML: shown
    literally, never as markup. Line breaks and control characters become a space (no fake heading
    on a line of its own), ``& < >`` become HTML entities (no tag, no image beacon) and the Markdown
    punctuation ``\\ ` * _ [ ] | ~`` is backslash-escaped (no link, no emphasis, no table cell), as
    are ``:``, ``@`` and the dot of ``www.`` (no autolinked URL or e-mail address)."""
    flat = _CONTROL.sub(" ", str(text))
    return html.escape(_MARKDOWN_SPECIAL.sub(r"\\\1", flat), quote=False)


def code_text(text: Any) -> str:
    """Text from an index inside a Markdown code span (shown literally there): no backtick to close
    the span, no line break."""
    return " ".join(str(text).replace("`", "'").split())


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet shows as text: strings starting with ``= + - @`` (or a tab or
    carriage return) are formulas there, so they get a leading ``'``; other values unchanged."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
