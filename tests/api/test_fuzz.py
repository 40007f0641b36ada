"""Schemathesis against the OpenAPI document: every operation, with auth.

No 5xx, and every response conforms to the document (status code, content type,
headers, body schema). The checks about *acceptance* of generated data are left
out on purpose: a schema-valid rule source that does not compile, or a dismiss of
a banner that does not exist, is rightly refused with a documented 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from kvadrupel.container import Container
from kvadrupel.settings import Settings

ADMIN = "a" * 24
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    c = Container(Settings(data_dir=tmp, admin_token=ADMIN, ingest_token="i" * 24,
                           portal_token="p" * 24, jwt_secret="s" * 40,
                           banner_longpoll_max_wait_s=1,  # a generated wait=3600 stays short
                           clock_start=datetime(2026, 11, 24)))
    c.migrate()
    application = create_app(c)
    with TestClient(application):  # lifespan: start-up and shut-down of the banner caches
        yield application
    c.close()


@pytest.fixture(scope="module")
def api_schema(app: Any) -> Any:
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations(api_schema: Any) -> list[Any]:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms(api_schema: Any, mode: GenerationMode) -> None:
    # (Looping here rather than schemathesis' pytest plugin, whose lazy fixture loader
    # does not work with pytest 9.)
    failures: list[str] = []
    operations = _operations(api_schema)
    assert len(operations) >= 8
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:  # negative mode: an operation without any input to break
            assert mode is GenerationMode.NEGATIVE, op.label
        except Exception as exc:  # collect every operation's failure, then report them all
            failures.append(f"{op.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_docs_page_and_document(app: Any) -> None:
    with TestClient(app) as client:
        r = client.get("/docs")
        assert r.status_code == 200 and "swagger" in r.text.lower()
        doc = client.get("/openapi.json").json()
    ops = [(p, m, op) for p, item in doc["paths"].items() for m, op in item.items()]
    assert ops
    for path, method, op in ops:
        for code, resp in op["responses"].items():
            html_page = "text/html" in op["responses"].get("200", {}).get("content", {})
            if code[0] in "45" and not html_page:
                assert list(resp["content"]) == ["application/problem+json"], (path, method, code)
    banners = doc["paths"]["/v1/users/{user_id}/banners"]["get"]
    assert {"200", "304", "401", "403", "422", "503"} <= set(banners["responses"])
    assert banners["responses"]["200"]["content"]["application/json"]["example"]["banners"]
