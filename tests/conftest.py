"""Shared fixtures. Each real service has its own fixture module:

* ``tests.fixtures.postgres`` — shard and control databases on the local server
* ``tests.fixtures.kafka``    — a real Kafka-protocol broker (Tansu) on loopback
* ``tests.fixtures.smtp``     — an aiosmtpd SMTP server on loopback

In CI every one of them must start; none of them skips silently.
"""

import pytest

from tests.fixtures.waiting import scaled

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.kafka",
    "tests.fixtures.smtp",
]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """``KVADRUPEL_TEST_TIMEOUT_SCALE`` (tests/fixtures/waiting.py) scales pytest-timeout's
    per-test limit too: a slower machine gets longer waits *and* room for them."""
    limit = getattr(config, "_env_timeout", None)  # set by pytest-timeout's own configure
    if limit:
        config._env_timeout = scaled(limit)
