"""lego-serve's /docs: the OpenAPI document as one self-contained HTML page.

FastAPI's own /docs loads Swagger UI's scripts and styles from a public CDN, so it is blank on a
machine without internet access. This page is rendered on the server from the same document
(/openapi.json): every route, and every field of a request body with its type, limits and default.
It loads nothing: no script, no stylesheet, no image, no other host.
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
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}: API</title><style>{STYLE}</style>",
        f"</head><body><h1>{title} {html.escape(str(info.get('version', '')))}</h1>",
        f"<p>{html.escape(str(info.get('summary') or info.get('description') or ''))}</p>",
        "<p>The machine-readable document: <a href='/openapi.json'>/openapi.json</a>. Every error answers one "
        "line of JSON, <code>{\"error\": \"...\"}</code>.</p>",
        _routes_table(openapi.get("paths", {})),
    ]
    for path, methods in openapi.get("paths", {}).items():
        for method, operation in methods.items():
            schema = _body_schema(operation)
            if schema:
                parts.append(f"<h2>{method.upper()} {html.escape(path)}: request fields</h2>")
                parts.append(_fields_table(schema))
    parts.append("</body></html>")
    return "\n".join(parts)


def _routes_table(paths: dict) -> str:
    rows = ["<h2>Routes</h2><table><tr><th>method</th><th>path</th><th>what it does</th><th>answers</th></tr>"]
    for path, methods in paths.items():
        for method, operation in methods.items():
            what = operation.get("description") or operation.get("summary") or ""
            codes = ", ".join(sorted(operation.get("responses", {})))
            rows.append(
                f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(what)}</td><td>{html.escape(codes)}</td></tr>"
            )
    return "".join(rows) + "</table>"


def _body_schema(operation: dict) -> dict | None:
    content = operation.get("requestBody", {}).get("content", {})
    return content.get("application/json", {}).get("schema")


def _fields_table(schema: dict) -> str:
    rows = ["<table><tr><th>field</th><th>type</th><th>limits</th><th>default</th><th>meaning</th></tr>"]
    for name, prop in schema.get("properties", {}).items():
        limits = "; ".join(filter(None, (_limits(p) for p in [prop, *prop.get("oneOf", [])])))
        default = json.dumps(prop["default"]) if "default" in prop else ""
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(_type(prop))}</td>"
            f"<td>{html.escape(limits)}</td><td>{html.escape(default)}</td>"
            f"<td>{html.escape(str(prop.get('description', '')))}</td></tr>"
        )
    return "".join(rows) + "</table>"


def _limits(prop: dict) -> str:
    """A schema's own limits in words: 'minimum 1, maximum 64', or its allowed values."""
    if "enum" in prop:
        return ", ".join(json.dumps(v) for v in prop["enum"])
    return ", ".join(f"{k} {_number(prop[k])}" for k in LIMIT_KEYS if k in prop)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


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
