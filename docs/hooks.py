"""MkDocs hook: pages generated at build time, so that they cannot drift from their source.

- ``configuration.md`` holds the marker ``<!-- schema-reference -->``; :func:`on_page_markdown`
  replaces it with :func:`configuration_markdown`, one table per section with every key of
  ``pipeline.config.schema.schema_rows()`` (type, default, choices, range, help): a key added to the schema
  appears in the next build.
- ``index.md`` (the home page) holds ``<!-- readme -->``, replaced by the README with its ``docs/``
  links made relative to the site (:func:`readme_markdown`).

``tests/test_docs.py`` calls both functions directly.
"""

from __future__ import annotations

import html
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = "<!-- schema-reference -->"
PAGE = "configuration.md"
README_MARKER = "<!-- readme -->"
HOME = "index.md"


def _escape(value: str) -> str:
    """Text safe inside a Markdown table cell: no HTML, emphasis, links, code or column breaks."""
    out = html.escape(value, quote=False)
    for char, entity in (("|", "&#124;"), ("*", "&#42;"), ("_", "&#95;"), ("[", "&#91;"), ("\\", "&#92;")):
        out = out.replace(char, entity)
    return out


def _text(value: str) -> str:
    """Help text for a cell; what the schema writes between backticks becomes code."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", _escape(value))


def _code(value: str) -> str:
    return f"<code>{_escape(value).replace('`', '&#96;')}</code>"


def configuration_markdown() -> str:
    """Every schema key as Markdown tables, one per section, in declaration order."""
    from pipeline.config.fields import parse_range
    from pipeline.config.schema import TRAINER_HELP, schema_rows
    from pipeline.config.usage import shown

    sections: dict[str, list] = {}
    for row in schema_rows():
        section = row.key.split(".", 1)[0] if "." in row.key else ""
        sections.setdefault(section, []).append(row)
    lines = []
    for section, rows in sections.items():
        title = f"`{section}.*`" if section else "Top level"
        lines += [f"### {title}", ""]
        if section == "trainer":
            lines += [f"{TRAINER_HELP.capitalize()} passes as `trainer.<name>=...`; these are the defaults.", ""]
        lines += ["| key | type | default | choices / range | meaning |", "|---|---|---|---|---|"]
        for row in rows:
            allowed = [_code(c) for c in row.choices] + ([_text(row.other)] if row.other else [])
            if row.range:
                each = " (each number)" if row.type.startswith("list") else ""
                allowed.append(_text(f"range{each}: {parse_range(row.range).short()}"))
            cells = [_code(row.key), _text(row.type), _code(shown(row.default)), ", ".join(allowed), _text(row.help)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def readme_markdown() -> str:
    """The README as the site's home page: its links into ``docs/`` point at the pages beside it."""
    return (ROOT / "README.md").read_text().replace("](docs/", "](")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' hook signature)
    if page.file.src_uri == HOME:
        if README_MARKER not in markdown:
            raise ValueError(f"docs/{HOME} lost its marker {README_MARKER}")
        return markdown.replace(README_MARKER, readme_markdown())
    if page.file.src_uri == PAGE:
        if MARKER not in markdown:
            raise ValueError(f"docs/{PAGE} lost its marker {MARKER}")
        return markdown.replace(MARKER, configuration_markdown())
    return markdown
