"""Event schema and operations; batching equals applying events one by one."""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.events import Event, apply_event, apply_events, parse_event
from kvadrupel.errors import EventError

BIG = 64 * 1024


def ev(**kw: object) -> Event:
    return Event.model_validate({"event_id": kw.pop("event_id", "e"), "user_id": 1} | kw)


def test_set_deep_merges_and_replaces_non_objects() -> None:
    doc = {"a": {"b": 1, "c": 2}, "x": 5}
    apply_event(doc, ev(set={"a": {"c": 3, "d": {"e": 4}}, "x": {"y": 1}, "p.q": 7}))
    assert doc == {"a": {"b": 1, "c": 3, "d": {"e": 4}}, "x": {"y": 1}, "p": {"q": 7}}


def test_unset_inc_append_max_min() -> None:
    doc = {"a": {"b": 1}, "n": 2, "l": [1, 2, 3], "d": "2026-01-01", "m": 5}
    apply_event(doc, ev(unset=["a.b", "missing.path"], inc={"n": 3, "new.k": 1},
                        append={"l": {"value": 4, "cap": 3}},
                        max={"d": "2026-02-01", "m": 4}, min={"m": 1, "first": "2020-01-01"}))
    assert doc == {"a": {}, "n": 5, "new": {"k": 1}, "l": [2, 3, 4], "d": "2026-02-01", "m": 1,
                   "first": "2020-01-01"}


@pytest.mark.parametrize("raw,reason", [
    (b"{not json", "malformed JSON"),
    (b"[1]", "JSON object"),
    (b'{"event_id": "e", "user_id": 1}', "at least one operation"),
    (b'{"event_id": "e", "user_id": 1, "set": {"a": 1}, "bogus": 1}', "bogus"),
    (b'{"event_id": "e", "user_id": 0, "set": {"a": 1}}', "user_id"),
    (b'{"event_id": "e", "user_id": "12a", "set": {"a": 1}}', "user_id"),
    (b'{"event_id": "e", "user_id": 9223372036854775808, "set": {"a": 1}}', "user_id"),
    (b'{"event_id": "e", "user_id": 1, "inc": {"a": "x"}}', "number"),
    (b'{"event_id": "e", "user_id": 1, "inc": {"a": true}}', "number"),
    (b'{"event_id": "e", "user_id": 1, "unset": ["a..b"]}', "unset"),
    (b'{"event_id": "e", "user_id": 1, "set": {"_private": 1}}', "bad key"),
    (b'{"event_id": "e", "user_id": 1, "max": {"d": "yesterday"}}', "ISO"),
    (b'{"event_id": "", "user_id": 1, "set": {"a": 1}}', "event_id"),
    (b'{"event_id": "e", "user_id": 1, "append": {"l": {"value": 1, "cap": 5000}}}', "cap"),
])
def test_bad_events_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EventError) as exc:
        parse_event(raw)
    assert reason in exc.value.reason


def test_path_into_a_non_object_rejects_only_that_event() -> None:
    events = [ev(event_id="1", set={"a": 1}), ev(event_id="2", inc={"a.b": 1}),
              ev(event_id="3", inc={"n": 1})]
    doc, seen, rejected, applied = apply_events(None, [], events, max_bytes=BIG)
    assert doc == {"a": 1, "n": 1}
    assert [e.event_id for e, _ in rejected] == ["2"]
    assert "not an object" in rejected[0][1]
    assert applied == 2 and seen == ["1", "3"]


def test_document_over_the_size_limit_is_refused() -> None:
    doc, _, rejected, applied = apply_events({"k": 1}, [], [ev(set={"big": "x" * 500})], max_bytes=200)
    assert doc == {"k": 1} and applied == 0
    assert "limit" in rejected[0][1]


def test_duplicate_event_ids_apply_once() -> None:
    e = ev(event_id="dup", inc={"n": 1})
    doc, seen, _, applied = apply_events(None, [], [e, e], max_bytes=BIG)
    doc, seen, _, applied2 = apply_events(doc, seen, [e], max_bytes=BIG)
    assert doc == {"n": 1} and applied == 1 and applied2 == 0


# ----------------------------------------------------------------- property
keys = st.sampled_from(["a", "b", "c"])
paths = st.lists(keys, min_size=1, max_size=3).map(".".join)
scalars = st.one_of(st.integers(-1000, 1000), st.text(max_size=3), st.booleans(), st.none())
values = st.recursive(scalars, lambda c: st.dictionaries(keys, c, max_size=3), max_leaves=6)
ops = st.fixed_dictionaries({}, optional={
    "set": st.dictionaries(keys, values, min_size=1, max_size=2),
    "unset": st.lists(paths, min_size=1, max_size=2),
    "inc": st.dictionaries(paths, st.integers(-5, 5), min_size=1, max_size=2),
    "append": st.dictionaries(paths, st.fixed_dictionaries({"value": scalars, "cap": st.integers(1, 3)}),
                              min_size=1, max_size=1),
    "max": st.dictionaries(paths, st.integers(-50, 50), min_size=1, max_size=1),
}).filter(bool)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, min_size=1, max_size=12), st.data())
def test_batches_equal_one_by_one_whatever_the_boundaries(op_list: list[dict], data: st.DataObject) -> None:
    events = [Event.model_validate({"event_id": f"e{i}", "user_id": 7} | o) for i, o in enumerate(op_list)]
    # Redeliveries: some events appear again later in the stream.
    dups = data.draw(st.lists(st.sampled_from(events), max_size=4))
    stream = events + dups

    # Oracle: one event at a time, each on its own, refused events leave no trace.
    oracle: dict = {}
    for e in events:
        trial = copy.deepcopy(oracle)
        try:
            apply_event(trial, e)
        except EventError:
            continue
        oracle = trial

    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=4))))
    doc, seen = None, []
    prev = 0
    for cut in [*cuts, len(stream)]:
        doc, seen, _, _ = apply_events(doc, seen, stream[prev:cut], max_bytes=BIG, seen_cap=1000)
        prev = cut
    assert orjson.dumps(doc or {}, option=orjson.OPT_SORT_KEYS) == orjson.dumps(oracle, option=orjson.OPT_SORT_KEYS)
