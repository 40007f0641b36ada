"""api/shedding.py in isolation: past ``max_inflight`` requests in flight, 503 +
Retry-After at once; ops endpoints and long-polls are never shed; 0 turns it off."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from api.shedding import LoadShedMiddleware

pytestmark = [pytest.mark.drill]


def _held_app(gate: asyncio.Event) -> Any:
    async def app(scope: dict, receive: Any, send: Any) -> None:
        await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def _scenario(max_inflight: int, paths: list[str]) -> list[tuple[int, str | None]]:
    gate = asyncio.Event()
    mw = LoadShedMiddleware(_held_app(gate), max_inflight=max_inflight)
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        held = [asyncio.create_task(client.get("/v1/users/1/banners")) for _ in range(3)]
        while mw.inflight < min(3, max_inflight) and max_inflight > 0:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        tasks = [asyncio.create_task(client.get(p)) for p in paths]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(*held, *tasks)
    assert mw.inflight == 0
    return [(r.status_code, r.headers.get("retry-after")) for r in out]


def test_sheds_past_the_limit_but_never_ops_or_long_polls() -> None:
    got = asyncio.run(
        _scenario(
            3,
            [
                "/v1/users/2/banners",
                "/healthz",
                "/readyz",
                "/metrics",
                "/v1/users/3/banners?since_version=4&wait=30",
            ],
        )
    )
    assert got[:3] == [(200, None)] * 3  # the admitted ones finish
    assert got[3] == (503, "1")  # past the limit: at once, retryable
    assert got[4:] == [(200, None)] * 4  # ops endpoints and the long-poll waited their turn


def test_zero_turns_it_off() -> None:
    got = asyncio.run(_scenario(0, ["/v1/users/2/banners"] * 5))
    assert {s for s, _ in got} == {200}
