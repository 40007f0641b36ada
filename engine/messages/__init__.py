"""Every message that crosses a process boundary on the bus, typed and versioned.

    events topic    Event (REST / producers -> ingest)    engine/messages/event.py
    jobs topic      RangeJob (scheduler -> evaluators)   UsersJob (ingest -> evaluators)
    results topic   Enter, Exit, Convert (evaluators -> delivery)
    *.dlq topics    DeadLetter (any consumer, for a message it cannot take)

Producers build these classes and :func:`encode` them; consumers :func:`decode_job` /
:func:`decode_result`, which raise :class:`MessageError` with the cause for bytes that
are not a valid message of a version this build reads; the consumer then publishes a
:class:`DeadLetter` and goes on (never a crash). Ingest events have their own
validating parser (:mod:`engine.messages.event`: a pydantic model, the public
schema of the REST and Kafka event API, with a hand-written fast path), whose
failures dead-letter the same way.

Versions. Every message carries ``v`` (:data:`VERSION`). A message without it was
written by a build from before the field existed (version 0): it has the same
fields and is read as such, so a rolling upgrade mixes old and new workers safely.
A version above :data:`VERSION` comes from a newer build: dead-lettered, not guessed.

msgspec Structs (not pydantic): decoding a result straight from JSON bytes into a
typed, validated object costs ~1 us against ~4 us with pydantic's
``model_validate_json`` and ~1.7 us for ``orjson.loads`` of an unchecked dict
(bench/bench_messages.py prints the figures per message kind).
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import msgspec

__all__ = ["VERSION", "Convert", "DeadLetter", "Enter", "EvalAnswer", "Exit", "Job", "MessageError",
           "RangeJob", "Result", "UsersJob", "dead_letter", "decode_answer", "decode_job",
           "decode_result", "encode"]

VERSION = 1


class MessageError(ValueError):
    """Bytes that are not a valid message (``cause`` says why)."""


class _Msg(msgspec.Struct, kw_only=True, omit_defaults=False):
    v: int = 0  # absent: written before versions (0); producers set VERSION


class RangeJob(_Msg, tag_field="type", tag="range"):
    """Evaluate every user of ``shard`` with ``lo <= id <= hi`` for run ``run_id``."""

    run_id: int
    range_no: int
    shard: int
    lo: int
    hi: int
    as_of: str  # ISO date
    rules: list[str] | None = None  # None: every active rule
    # full: every user of the range; due: the users due in the wake-up index, after
    # ``sweep`` (rule keys whose version changed) over every user; verify: due, then
    # every user, counting what changes as mismatches. Absent (older builds): full.
    mode: str = "full"
    sweep: list[str] | None = None


class UsersJob(_Msg, tag_field="type", tag="users"):
    """Re-evaluate these users of ``shard`` now (after ingest changed them)."""

    shard: int
    user_ids: list[int]
    as_of: str | None = None  # None: the evaluator's today
    # Per user, the profile paths its events changed (None: not known, every rule);
    # the evaluator re-evaluates only the rules whose read-set meets them.
    paths: list[list[str] | None] | None = None


Job = RangeJob | UsersJob


class Exit(_Msg, tag_field="kind", tag="exit"):
    """A rule stopped matching a user: the episode's banner goes."""

    user_id: int
    rule: str
    episode: int
    version: int
    as_of: str
    priority: int = 0
    run_id: int | None = None


class Enter(_Msg, tag_field="kind", tag="enter"):
    """A rule started matching a user: a new episode, with its rendered content."""

    user_id: int
    rule: str
    episode: int
    version: int
    as_of: str
    priority: int = 0
    run_id: int | None = None
    banner: dict[str, Any] | None = None
    email: dict[str, Any] | None = None
    push: dict[str, Any] | None = None
    lang: str | None = None
    user_lang: str | None = None
    tz: str | None = None
    why: Any = None
    # The content variant rendered (channels/variants.py); None: the rule has none.
    variant: str | None = None


class Convert(_Msg, tag_field="kind", tag="goal"):
    """A rule's goal held for a user within the attribution window of the episode
    that started on ``started`` (rules/goals.py): the delivery worker counts the
    first one per episode as a conversion of that episode's arm (channels/goals.py)."""

    user_id: int
    rule: str
    episode: int
    version: int
    started: str  # ISO date the episode started (its as-of date)
    as_of: str  # ISO date of the evaluation at which the goal held
    run_id: int | None = None


Result = Enter | Exit | Convert


class EvalAnswer(msgspec.Struct):
    """A sandbox child's answer to an evaluated batch (engine/evaluate/child.py): the
    result messages and the users' new states. Decoded with its types checked — a
    child ran rule code and is not trusted beyond that."""

    results: list[Result]
    # (user_id, new state or None: unchanged, wake_on ISO date or None) per user evaluated
    states: list[tuple[int, dict[str, list[Any]] | None, str | None]]


class DeadLetter(_Msg):
    """A message a consumer could not take: why, where it came from, its bytes
    (UTF-8 text, or base64 when not valid UTF-8)."""

    cause: str
    source: dict[str, Any] | None = None  # topic, partition, offset
    original: str = ""
    encoding: str = "utf-8"
    event_id: str | None = None


class _Version(msgspec.Struct):
    v: int = 0


_encoder = msgspec.json.Encoder()
_versions = msgspec.json.Decoder(_Version)
_jobs: msgspec.json.Decoder[Job] = msgspec.json.Decoder(Job)
_results: msgspec.json.Decoder[Result] = msgspec.json.Decoder(Result)
_answers = msgspec.json.Decoder(EvalAnswer)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


_Versioned = TypeVar("_Versioned", bound=_Msg | _Version)


def _check(msg: _Versioned) -> _Versioned:
    if msg.v > VERSION or msg.v < 0:
        raise MessageError(f"unknown message version {msg.v} (this build reads 0..{VERSION})")
    return msg


def _failed(data: bytes, what: str, exc: Exception) -> MessageError:
    # A newer build's message may not fit this build's fields: say so, not "malformed".
    try:
        _check(_versions.decode(data))
    except MessageError as newer:
        return newer
    except msgspec.DecodeError:
        pass
    return MessageError(f"malformed {what}: {exc}")


def decode_job(data: bytes) -> Job:
    try:
        return _check(_jobs.decode(data))
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise _failed(data, "job", exc) from None


def decode_result(data: bytes) -> Result:
    try:
        return _check(_results.decode(data))
    except msgspec.DecodeError as exc:
        raise _failed(data, "result", exc) from None


def decode_answer(data: bytes) -> EvalAnswer:
    try:
        answer = _answers.decode(data)
    except msgspec.DecodeError as exc:
        raise MessageError(f"malformed answer: {exc}") from None
    for r in answer.results:
        _check(r)
    return answer


def dead_letter(cause: str, original: bytes, source: dict[str, Any] | None = None,
                event_id: str | None = None) -> bytes:
    """The encoded :class:`DeadLetter` for ``original``."""
    try:
        text, encoding = original.decode(), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(original).decode(), "base64"
    return encode(DeadLetter(v=VERSION, cause=cause, source=source, original=text,
                             encoding=encoding, event_id=event_id))
