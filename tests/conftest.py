"""Shared fixtures. Each real service has its own fixture module:

* ``tests.fixtures.postgres`` — shard and control databases on the local server
* ``tests.fixtures.kafka``    — a real Kafka-protocol broker (Tansu) on loopback
* ``tests.fixtures.smtp``     — an aiosmtpd SMTP server on loopback

In CI every one of them must start; none of them skips silently.
"""

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.kafka",
    "tests.fixtures.smtp",
]
