"""The playground page of lego-serve: one static page (index.html, app.js, style.css, icon.svg) served at /.

It calls the public API only (GET /v1/model and /healthz, POST /v1/plan and /v1/images, a job's
events, result and DELETE) and loads nothing from any other host: the policy header below makes
the browser refuse any such request.
"""

from __future__ import annotations

from importlib.resources import files

# path served -> (file in this package, media type)
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
    "/ui/icon.svg": ("icon.svg", "image/svg+xml"),
}
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def page_files() -> dict[str, tuple[bytes, str]]:
    """Each path of the page with its bytes and media type, read from the installed package."""
    root = files(__name__)
    return {path: (root.joinpath(name).read_bytes(), media_type) for path, (name, media_type) in PAGES.items()}
