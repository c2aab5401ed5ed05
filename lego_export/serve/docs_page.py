"""lego-serve's /docs: the OpenAPI document (/openapi.json) as one self-contained HTML page.

FastAPI's own /docs loads Swagger UI from a public CDN, so it is blank without internet access. This
page lists every route, and every request field with its type, limits and default; it loads nothing.
"""

from __future__ import annotations

import html
import json

# Inline styles only; the browser is told to load nothing else.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}"
    "code{background:#f4f4f4;padding:0 .2em}h2{margin-top:1.5em}"
)
LIMIT_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "pattern")


def docs_html(openapi: dict) -> str:
    """The page for an OpenAPI document: its routes, then each request body's fields."""
    info = openapi.get("info", {})
    title = html.escape(str(info.get("title", "API")))
    operations = [(path, method, op) for path, ops in openapi.get("paths", {}).items() for method, op in ops.items()]
    routes = [_route(*operation) for operation in operations]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}: API</title><style>{STYLE}</style>",
        f"</head><body><h1>{title} {html.escape(str(info.get('version', '')))}</h1>",
        f"<p>{html.escape(str(info.get('summary') or info.get('description') or ''))}</p>",
        "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a>. Every error answers one "
        'line of JSON, <code>{"error": "..."}</code>.</p>',
        "<h2>Routes</h2>" + _table(("method", "path", "what it does", "answers"), routes, code=1),
    ]
    for path, method, op in operations:
        schema = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if schema:
            parts.append(f"<h2>{method.upper()} {html.escape(path)}: request fields</h2>")
            fields = [_field(name, prop) for name, prop in schema.get("properties", {}).items()]
            parts.append(_table(("field", "type", "limits", "default", "meaning"), fields, code=0))
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]], code: int) -> str:
    """An HTML table of the rows' text, escaped; the cells of column `code` set as code."""

    def cell(i: int, text: str) -> str:
        text = html.escape(text)
        return f"<td><code>{text}</code></td>" if i == code else f"<td>{text}</td>"

    lines = ["<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    lines += ["<tr>" + "".join(cell(i, text) for i, text in enumerate(row)) + "</tr>" for row in rows]
    return "<table>" + "".join(lines) + "</table>"


def _route(path: str, method: str, op: dict) -> tuple[str, ...]:
    """A route's row: method, path, what it does, the statuses it answers."""
    what = op.get("description") or op.get("summary") or ""
    return method.upper(), path, what, ", ".join(sorted(op.get("responses", {})))


def _field(name: str, prop: dict) -> tuple[str, ...]:
    """A request field's row: name, type, limits (with its alternatives'), default, meaning."""
    limits = "; ".join(filter(None, map(_limits, [prop, *prop.get("oneOf", [])])))
    default = json.dumps(prop["default"]) if "default" in prop else ""
    return name, _type(prop), limits, default, str(prop.get("description", ""))


def _limits(prop: dict) -> str:
    """A schema's own limits in words: 'minimum 1, maximum 64', or its allowed values."""
    if "enum" in prop:
        return ", ".join(json.dumps(v) for v in prop["enum"])
    return ", ".join(
        f"{k} {prop[k]:g}" if isinstance(prop[k], float) else f"{k} {prop[k]}" for k in LIMIT_KEYS if k in prop
    )


def _type(prop: dict) -> str:
    """A field's type in words: 'integer', 'number or null', 'one of: integer, string'."""
    if "oneOf" in prop:
        return "one of: " + ", ".join(_type(p) for p in prop["oneOf"])
    kind = prop.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(kind)
    if kind == "array" and "items" in prop:
        return f"list of {_type(prop['items'])}"
    return kind
