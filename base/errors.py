"""The project's exception tree.

    KvadrupelError
     ├── ConfigError            a setting is missing or wrong
     ├── BusError               the message bus failed (Kafka or in-process)
     ├── StorageError           a profile/control database failed
     │    └── ShardUnavailable  one shard cannot be reached (transient)
     ├── ChannelError           a delivery channel failed
     │    ├── TransientDeliveryError   retry later (connection refused, 4xx)
     │    └── PermanentDeliveryError   do not retry (5xx for that address)
     ├── RuleError              a rule cannot be compiled or run
     │    ├── RuleCompileError  syntax or sandbox policy error (has ``line``)
     │    ├── RuleTimeout       a rule exceeded its time budget
     │    ├── RuleRuntimeError  a rule raised while evaluating a profile
     │    └── SandboxCrash      the child process running rule code died (has ``reason``)
     └── EventError             an ingest event is invalid (has ``reason``)

Library exceptions are translated at the boundary (``raise ShardUnavailable(...)
from exc``) so callers depend on this tree, never on psycopg or confluent-kafka.
"""

from __future__ import annotations


class KvadrupelError(Exception):
    """Root of every error raised on purpose by Kvadrupel."""


class ConfigError(KvadrupelError):
    pass


class BusError(KvadrupelError):
    pass


class StorageError(KvadrupelError):
    pass


class ShardUnavailable(StorageError):
    def __init__(self, shard: int, message: str) -> None:
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard


class ChannelError(KvadrupelError):
    pass


class TransientDeliveryError(ChannelError):
    pass


class PermanentDeliveryError(ChannelError):
    pass


class RuleError(KvadrupelError):
    pass


class RuleCompileError(RuleError):
    key: str | None = None  # the rule's, where a RuleSet compiled it

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line
        self.reason = message


class RuleTimeout(RuleError):
    pass


class RuleRuntimeError(RuleError):
    pass


class SandboxCrash(RuleError):
    """The disposable child process that ran rule code died or was killed: a native
    crash (``SIGSEGV``), the address-space or CPU limit, or no answer in time.
    ``reason`` says which, in words; the process that asked is unharmed."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the rule sandbox process {reason}")
        self.reason = reason


class EventError(KvadrupelError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RuleValidationError(RuleError):
    """A submitted rule has problems: ``problems`` is a list of
    ``{"field": ..., "line": ... or None, "message": ...}``."""

    def __init__(self, problems: list[dict[str, object]]) -> None:
        super().__init__("; ".join(str(p["message"]) for p in problems))
        self.problems = problems


class NotFound(KvadrupelError):
    pass


class Conflict(KvadrupelError):
    pass
