"""lego-serve's OpenAPI document describes every request field with its type and limits, and a real
server on 127.0.0.1, fuzzed from that document (schemathesis: bodies that fit the schema and bodies
that break it), never answers 5xx, logs no traceback, and refuses with a one-line JSON error."""

from __future__ import annotations

import logging
from dataclasses import asdict

import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="the schema fuzz test needs schemathesis: pip install '.[dev]'"
)
pytest.importorskip("fastapi", reason="lego-serve needs FastAPI: pip install '.[serve]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from lego_export.serve.config import ServeConfig  # noqa: E402
from lego_export.serve.service import ImageService  # noqa: E402
from lego_export.serve.validation import FIELDS, Limits  # noqa: E402
from tests.test_serve import TINY, HookedBackend, running  # noqa: E402

# Small limits keep every admitted request cheap (the tiny engines, at most 4 images of 6 steps).
LIMITS = Limits(max_resolution=32, max_steps=6, max_images=4)
EXAMPLES = {"POST": 60}  # per operation and generation mode; others 15


def test_the_openapi_document_states_every_field_and_its_limits():
    backend = HookedBackend()
    service = ImageService(ServeConfig(engines=str(TINY), calibrate=False, **asdict(LIMITS)), backend, backend.manifest)
    try:
        with running(service) as http:
            spec = http.get("/openapi.json").json()
            assert http.get("/docs").status_code == 200
    finally:
        service.close(5)
    body = spec["paths"]["/v1/images"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(body["properties"]) == FIELDS and body["additionalProperties"] is False
    fields = body["properties"]
    assert fields["steps"]["maximum"] == 6 and fields["num"]["maximum"] == 4 and fields["priority"]["maximum"] == 9
    assert fields["class"]["oneOf"][0]["maximum"] == 9  # the model's ten classes
    assert {"/v1/jobs/{job_id}", "/v1/jobs/{job_id}/result", "/v1/jobs/{job_id}/events"} <= set(spec["paths"])


def test_lego_serve_without_docs_serves_no_schema():
    from lego_export.serve.app import create_app

    paths = {route.path for route in create_app(lambda: None, config=ServeConfig(docs=False)).routes}
    assert "/openapi.json" not in paths and "/docs" not in paths


def test_fuzzed_requests_never_get_a_server_error(caplog):
    backend = HookedBackend()
    config = ServeConfig(engines=str(TINY), calibrate=False, **asdict(LIMITS), max_queue=8, job_ttl_s=30)
    service = ImageService(config, backend, backend.manifest)
    caplog.set_level(logging.WARNING)
    problems: list[str] = []
    ran: list[str] = []
    with running(service) as http:
        url = str(http.base_url).rstrip("/")
        schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json())
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in schemathesis.GenerationMode:

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(
                    max_examples=EXAMPLES.get(operation.method.upper(), 15),
                    deadline=None,
                    database=None,
                    derandomize=True,
                    suppress_health_check=list(HealthCheck),
                )
                def check(case) -> None:
                    response = case.call(base_url=url, timeout=60)
                    where = f"{case.method} {case.formatted_path} {case.body!r:.200}"
                    if response.status_code >= 500:
                        problems.append(f"{where}: {response.status_code} {response.text[:200]}")
                    elif response.status_code >= 400:
                        text = response.text.strip()
                        data = response.json()
                        if "\n" in text or not isinstance(data.get("error"), str) or not data["error"]:
                            problems.append(f"{where}: {response.status_code} not a one-line error: {text[:200]}")

                try:
                    check()
                except Unsatisfiable:  # no invalid input exists (an operation without parameters)
                    assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
                    ran.append(f"{operation.label}: no negative cases")
                else:
                    ran.append(f"{operation.label}: {mode.value}")
    assert {"POST /v1/images: positive", "POST /v1/images: negative"} <= set(ran), ran
    assert len([r for r in ran if r.endswith(": positive")]) == 9, ran  # every operation
    assert not problems, "\n".join(problems[:10])
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks[0].getMessage()
