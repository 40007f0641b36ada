"""Event schema and operations; batching equals applying events one by one."""

from __future__ import annotations

import copy

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from base.errors import EventError
from engine.ingest.events import apply_event, apply_events, apply_user
from engine.messages.event import MAX_DEPTH, Event, FastEvent, _fast, parse_event

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


def test_max_compares_dates_and_datetimes_as_instants() -> None:
    doc = {"seen": "2026-01-01T10:00:00+03:00"}
    apply_event(doc, ev(max={"seen": "2026-01-01T08:00:00Z"}))  # 11:00 Moscow: later
    assert doc == {"seen": "2026-01-01T08:00:00Z"}
    apply_event(doc, ev(min={"seen": "2026-01-01"}))  # midnight: earlier
    assert doc == {"seen": "2026-01-01"}


@pytest.mark.parametrize("raw,reason", [
    (b"{not json", "malformed JSON"),
    (b"[1]", "JSON object"),
    (b'{"event_id": "e", "user_id": 1}', "at least one operation"),
    (b'{"event_id": "e", "user_id": 1, "set": {}}', "at least one operation"),
    (b'{"event_id": "e", "user_id": 1, "set": {"a": 1}, "bogus": 1}', "bogus"),
    (b'{"event_id": "e", "user_id": 1, "merge": {"a": 1}}', "merge"),
    (b'{"event_id": "e", "user_id": 0, "set": {"a": 1}}', "user_id"),
    (b'{"event_id": "e", "user_id": "12a", "set": {"a": 1}}', "user_id"),
    (b'{"event_id": "e", "user_id": 9223372036854775808, "set": {"a": 1}}', "user_id"),
    (b'{"event_id": "e", "user_id": 1, "inc": {"a": "x"}}', "number"),
    (b'{"event_id": "e", "user_id": 1, "inc": {"a": true}}', "number"),
    (b'{"event_id": "e", "user_id": 1, "inc": {"a": 9223372036854775808}}', "out of range"),
    (b'{"event_id": "e", "user_id": 1, "unset": ["a..b"]}', "unset"),
    (b'{"event_id": "e", "user_id": 1, "unset": ["a\\n"]}', "unset"),
    (b'{"event_id": "e", "user_id": 1, "set": {"a\\n": 1}}', "bad key"),
    (b'{"event_id": "e", "user_id": 1, "set": {"_private": 1}}', "bad key"),
    (b'{"event_id": "e", "user_id": 1, "max": {"d": "yesterday"}}', "ISO"),
    (b'{"event_id": "", "user_id": 1, "set": {"a": 1}}', "event_id"),
    (b'{"event_id": "e", "user_id": 1, "append": {"l": {"value": 1, "cap": 5000}}}', "cap"),
    (b'{"event_id": "e", "user_id": 1, "append": {"l": {"cap": 5}}}', "value"),
    (b'{"event_id": "e", "user_id": 1, "set": {"a": "x\\u0000y"}}', "NUL"),
    (b'{"event_id": "e", "user_id": 1, "set": {"a": {"k\\u0000": 1}}}', "NUL"),
    (b'{"event_id": "e\\u0000", "user_id": 1, "set": {"a": 1}}', "NUL"),
    (b'{"event_id": "e", "user_id": 1, "ts": "soon", "set": {"a": 1}}', "ts"),
])
def test_bad_events_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(EventError) as exc:
        parse_event(raw)
    assert reason in exc.value.reason


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    deep: object = 1
    for _ in range(MAX_DEPTH):
        deep = {"k": deep}
    ok = {"event_id": "e", "user_id": 1, "set": {"a": deep}}
    assert parse_event(orjson.dumps(ok)).set == {"a": deep}
    too_deep = {"event_id": "e", "user_id": 1, "append": {"l": {"value": [deep]}}}
    with pytest.raises(EventError, match="nested deeper"):
        parse_event(orjson.dumps(too_deep))


def test_an_event_larger_than_the_profile_limit_is_refused() -> None:
    raw = orjson.dumps({"event_id": "e", "user_id": 1, "set": {"a": "x" * 300}})
    assert parse_event(raw, max_bytes=1000).set == {"a": "x" * 300}
    with pytest.raises(EventError, match="larger than the 200-byte"):
        parse_event(raw, max_bytes=200)


def test_path_into_a_non_object_rejects_only_that_event() -> None:
    events = [ev(event_id="1", set={"a": 1}), ev(event_id="2", inc={"a.b": 1}),
              ev(event_id="3", inc={"n": 1})]
    doc, seen, rejected, applied = apply_events(None, [], events, max_bytes=BIG)
    assert doc == {"a": 1, "n": 1}
    assert [e.event_id for e, _ in rejected] == ["2"]
    assert "not an object" in rejected[0][1]
    assert applied == 2 and seen == ["1", "3"]


def test_document_over_the_size_limit_is_refused() -> None:
    doc, _, rejected, applied = apply_events(
        {"k": 1}, [], [ev(set={"big": "x" * 500})], max_bytes=200
    )
    assert doc == {"k": 1} and applied == 0
    assert "limit" in rejected[0][1]


def test_duplicate_event_ids_apply_once() -> None:
    e = ev(event_id="dup", inc={"n": 1})
    doc, seen, _, applied = apply_events(None, [], [e, e], max_bytes=BIG)
    doc, seen, _, applied2 = apply_events(doc, seen, [e], max_bytes=BIG)
    assert doc == {"n": 1} and applied == 1 and applied2 == 0


def test_the_duplicate_window_is_the_last_seen_cap_ids_of_the_user() -> None:
    first = ev(event_id="first", inc={"n": 1})
    others = [ev(event_id=f"o{i}", inc={"m": 1}) for i in range(3)]
    u = apply_user(None, [], [first, *others], max_bytes=BIG, seen_cap=3)
    assert u.seen == ["o0", "o1", "o2"]  # "first" fell out of the window...
    again = apply_user(u.encoded, u.seen, [first, others[2]], max_bytes=BIG, seen_cap=3)
    assert again.doc == {"n": 2, "m": 3}  # ...so a late retry of it applies again
    assert again.applied == 1


def test_changed_tells_a_real_change_from_a_no_op() -> None:
    u = apply_user({"m": 5}, [], [ev(event_id="a", max={"m": 3})], max_bytes=BIG)
    assert u.applied == 1 and not u.changed and u.seen == ["a"]
    u = apply_user(u.encoded, u.seen, [ev(event_id="b", max={"m": 9})], max_bytes=BIG)
    assert u.changed and u.doc == {"m": 9} and orjson.loads(u.encoded) == {"m": 9}
    # Stored JSON text (as PostgreSQL returns it) works the same
    u = apply_user('{"m": 9}', [], [ev(event_id="c", inc={"m": 0})], max_bytes=BIG)
    assert u.applied == 1 and not u.changed


# ----------------------------------------------------------- fast path = model
names = st.sampled_from(["a", "b", "a.b", "x-y_1", "a..b", "_p", "a\n", "A" * 300, ""])
json_scalars = st.one_of(
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(names, c, max_size=3),
    max_leaves=8,
)
op_values = st.one_of(
    json_values,
    st.dictionaries(names, json_values, max_size=3),
    st.lists(names, max_size=3),
    st.dictionaries(
        names,
        st.fixed_dictionaries(
            {"value": json_values},
            optional={
                "cap": st.one_of(st.integers(-5, 2000), st.booleans(), st.just("3"), st.just(3.0))
            },
        ),
        max_size=2,
    ),
    st.dictionaries(
        names,
        st.one_of(
            st.sampled_from(["2026-01-01", "2026-01-01T10:00:00Z", "nope"]),
            st.integers(-(2**64), 2**64),
            st.floats(),
        ),
        max_size=2,
    ),
)
good_paths = st.sampled_from(["a", "b", "a.b", "x-y_1", "orders.total", "A" * 256])
numbers = st.one_of(
    st.integers(-(2**63) + 1, 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e18, max_value=1e18),
)
valid = st.fixed_dictionaries(
    {"event_id": st.text(min_size=1, max_size=128).filter(lambda s: "\x00" not in s),
     "user_id": st.one_of(st.integers(1, 2**63 - 1), st.integers(1, 10**9).map(str))},
    optional={
        "ts": st.sampled_from(["2026-11-22T10:00:00Z", "2026-11-22", 1700000000, None]),
        "set": st.dictionaries(good_paths, json_values.filter(lambda v: "\x00" not in repr(v)),
                               max_size=2),
        "unset": st.lists(good_paths, max_size=2),
        "inc": st.dictionaries(good_paths, numbers, max_size=2),
        "append": st.dictionaries(good_paths, st.fixed_dictionaries(
            {"value": json_scalars}, optional={"cap": st.integers(1, 1000)}), max_size=2),
        "max": st.dictionaries(good_paths, st.one_of(numbers, st.sampled_from(
            ["2026-01-01", "2026-01-01T10:00:00Z", "2026-01-01T10:00:00+03:00"])), max_size=2),
        "min": st.dictionaries(good_paths, numbers, max_size=1),
    },
)
fields = st.sampled_from(
    ["event_id", "user_id", "ts", "set", "unset", "inc", "append", "max", "min", "other"]
)
wild = st.one_of(
    op_values,
    st.text(max_size=130),
    st.integers(-5, 2**64),
    st.sampled_from(["042", "4x", ""]),
    st.booleans(),
    st.floats(),
)


@st.composite
def candidates(draw: st.DrawFn) -> dict:
    """Mostly valid events; about half with one field replaced by something odd."""
    data = draw(valid)
    if draw(st.booleans()):
        data[draw(fields)] = draw(wild)
    return data


@settings(max_examples=600, deadline=None)
@given(candidates())
def test_the_fast_path_accepts_only_what_the_model_accepts_with_the_same_values(data: dict) -> None:
    try:
        model = Event.model_validate(data).model_dump()
    except ValueError:
        model = None
    fast = _fast(copy.deepcopy(data))
    if fast is not None:  # the fast path may defer (None); when it answers, it agrees
        assert model is not None, data
        assert fast.model_dump() == model
    try:
        parsed = parse_event(data).model_dump()
    except EventError:
        parsed = None
    assert parsed == model


def test_the_fast_path_takes_the_common_shapes() -> None:
    raw = {"event_id": "e-1", "user_id": "42", "ts": "2026-11-22T10:00:00Z",
           "set": {"driver_license": {"expires_on": "2027-01-10"}}, "unset": ["vehicle.plate"],
           "inc": {"orders.total": 1}, "append": {"orders.recent": {"value": {"id": 7}}},
           "max": {"orders.last_at": "2026-11-22"}, "min": {"first": 3}}
    fast = parse_event(orjson.dumps(raw))
    assert isinstance(fast, FastEvent)
    assert fast.model_dump() == Event.model_validate(raw).model_dump()
    assert fast.append["orders.recent"].cap == 20


# ----------------------------------------------------------------- property
keys = st.sampled_from(["a", "b", "c"])
paths = st.lists(keys, min_size=1, max_size=3).map(".".join)
scalars = st.one_of(
    st.integers(-1000, 1000),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=3),
    st.booleans(),
    st.none(),
)
values = st.recursive(scalars, lambda c: st.dictionaries(keys, c, max_size=3), max_leaves=6)
ops = st.fixed_dictionaries(
    {},
    optional={
        "set": st.dictionaries(keys, values, min_size=1, max_size=2),
        "unset": st.lists(paths, min_size=1, max_size=2),
        "inc": st.dictionaries(paths, st.integers(-5, 5), min_size=1, max_size=2),
        "append": st.dictionaries(
            paths,
            st.fixed_dictionaries({"value": scalars, "cap": st.integers(1, 3)}),
            min_size=1,
            max_size=1,
        ),
        "max": st.dictionaries(paths, st.integers(-50, 50), min_size=1, max_size=1),
    },
).filter(bool)


def oracle(events: list, max_bytes: int = BIG, rejected: list | None = None,
           window: int | None = None) -> dict:
    """One event at a time, each on its own; a refused one leaves no trace (and
    goes to ``rejected``); an id among the last ``window`` applied ones (all, if
    None) is skipped."""
    doc: dict = {}
    applied: list[str] = []
    for e in events:
        if e.event_id in (applied if window is None else applied[-window:]):
            continue
        trial = copy.deepcopy(doc)
        try:
            apply_event(trial, e)
        except EventError:
            if rejected is not None:
                rejected.append(e)
            continue
        if len(orjson.dumps(trial)) > max_bytes:
            if rejected is not None:
                rejected.append(e)
            continue
        doc = trial
        applied.append(e.event_id)
    return doc


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, min_size=1, max_size=12), st.data())
def test_batches_equal_one_by_one_whatever_the_boundaries(
    op_list: list[dict], data: st.DataObject
) -> None:
    events = [parse_event({"event_id": f"e{i}", "user_id": 7} | o) for i, o in enumerate(op_list)]
    # Redeliveries: some events appear again, anywhere later in the stream.
    stream = list(events)
    for dup in data.draw(st.lists(st.sampled_from(events), max_size=5)):
        stream.insert(data.draw(st.integers(stream.index(dup) + 1, len(stream))), dup)
    max_bytes = data.draw(st.sampled_from([BIG, 120]))  # a small limit makes some events fail
    window = data.draw(st.sampled_from([1, 2, 3, 1000]))  # the duplicate window (seen_cap)

    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=4))))
    doc, seen = None, []
    prev = 0
    for cut in [*cuts, len(stream)]:
        # The stored form between batches: orjson bytes, as the stores keep it.
        u = apply_user(doc, seen, stream[prev:cut], max_bytes=max_bytes, seen_cap=window)
        doc, seen = u.encoded, u.seen
        prev = cut
    got = orjson.loads(doc) if doc else {}
    assert orjson.dumps(got, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        oracle(stream, max_bytes, window=window), option=orjson.OPT_SORT_KEYS)
