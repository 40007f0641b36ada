"""CPU budgets for rules: a watchdog thread that interrupts a rule running too long.

Two budgets, both in CPU time of the evaluating thread (not wall time, so a
machine starved of CPU does not make a healthy rule overrun):

* per profile (``KVADRUPEL_RULE_BUDGET_MS``, 50 ms): one rule on one profile;
* per batch (``KVADRUPEL_RULE_BATCH_BUDGET_MS``, 1000 ms): one rule over one batch
  of profiles (the evaluator's batches hold up to 256). It catches the rule that
  never trips the first budget but is slow on every profile: 5 ms per profile is
  fine once and 83 CPU-hours over 60M users.

Mechanism (chosen because it costs the evaluator one list store per rule)
-------------------------------------------------------------------------
Every thread that evaluates rules owns a :class:`Slot`. Before it calls rule *i*
of a profile the evaluator writes a fresh sequence number into ``slot.box[0]``
(a single ``STORE_SUBSCR``, ~10 ns: no clock is read on the hot path) and it
writes 0 when the profile is done.

One daemon *watchdog* thread polls the slots every ``tick`` (budget / 5,
clamped to 2..10 ms) and reads each armed thread's CPU clock
(``pthread_getcpuclockid``; one ``clock_gettime`` per slot per tick, ~0.3 us).
It remembers the thread's CPU time when it first saw a sequence number; when the
same number is still there after the thread has used ``budget`` seconds of CPU it
injects :class:`BudgetExceeded` into that thread with
``ctypes.pythonapi.PyThreadState_SetAsyncExc``. The interpreter raises it in the
evaluating thread at the next bytecode boundary it checks (loop back-edges,
function entries, returns from C calls), i.e. inside the rule.

Why the rule cannot swallow it: ``BudgetExceeded`` derives from
``BaseException``, not ``Exception``, and the sandbox policy (rules/policy.py)
refuses bare ``except:``, ``except BaseException`` and ``except Exception`` (only
a fixed list of specific exceptions may be named, and the names cannot be
rebound; see "Races" for why not even ``Exception``),
``try/finally`` (a ``finally`` could loop or ``return`` after the interrupt) and
``with``. The evaluator translates it into a timeout (``Outcome.timeouts`` /
:class:`~base.errors.RuleTimeout`).

Races, and why they are harmless
--------------------------------
* The watchdog checks ``box[0] == seq`` and calls ``SetAsyncExc`` in one
  function with no bytecode boundary in between that could hand the GIL to the
  evaluator (``_fire``), so nothing is ever injected after the evaluator moved
  ``box[0]`` on: never after a profile is done, never into the caller.
* An interrupt can be lost: raising it inside an ``except`` handler instantiates
  the exception at once, and at the recursion limit that fails with a
  RecursionError (MemoryError when memory is exhausted) instead. Rules cannot
  catch those (no ``except Exception``), so the rule still stops, with an error.
  The watchdog also injects again at every tick for as long as the same rule
  keeps running.
* It records ``slot.fired_seq`` before injecting, so the evaluator knows which
  rule ran out of time even when the exception lands a few bytecodes later (in
  the next rule or in bookkeeping); the evaluator then marks that rule as timed
  out and re-runs the rules after it (rules are pure functions of the profile).
* Every handler of ``BudgetExceeded`` in the evaluator starts with
  ``box[0] = 0`` then ``clear_async_exc(tid, None)`` (``SetAsyncExc(tid, NULL)``),
  with no bytecode boundary before the C call: once it ran, nothing is pending
  and nothing more can be injected. A profile that is done clears the same way
  when ``fired_seq`` belongs to it.

Guarantees and limits
---------------------
* A rule is stopped once it has used between ``budget`` and about ``budget +
  2 ticks`` of CPU (the watchdog first sees a rule up to a tick after it
  started, then looks once a tick), plus up to a 5 ms GIL switch interval for
  the watchdog to get its turn: measured 76 ms of CPU for a 50 ms budget. In
  wall time that is later on an overloaded machine, but a rule only overruns
  for what it computes itself. Where the platform has no per-thread CPU clocks
  (``time.pthread_getcpuclockid``: Linux and most Unixes have it) the watchdog
  falls back to wall time.
* CPU time of a thread includes garbage collection that the rule's allocations
  happen to trigger; a long collection can push a healthy rule over. The
  evaluator therefore confirms an overrun before it quarantines (re-runs the rule
  alone, with the collector off): engine/evaluate/worker.py.
* Asynchronous exceptions are only delivered between bytecodes: one long C call
  is not interrupted. The sandbox bounds those (rules/guards.py: ``*``, ``**``,
  ``<<``, ``%``, ``+``, ``range``, ``sum``, ``str``, ``join``, ``replace``,
  ``round`` ...); what remains is a C call over data the rule could build within
  the limits (e.g. ``sorted`` of 10**5 equal 64 KB strings, well under a second).
  Run nightly evaluators as worker processes that a supervisor restarts.
* Cost (bench/bench_sandbox.py, budget vs no budget): about 25 ns per rule call
  all told: the sequence-number store, a little per-profile bookkeeping, and the
  watchdog taking the GIL 100-500 times a second while rules run (it parks on an
  event when idle) - 3-5 % on top of sandboxed evaluation; charging the batch
  budget adds one store per profile and one ``clock_gettime`` per tick (~1 %).

Batch budget: a sampling profiler for free
-----------------------------------------
While a batch is open on a slot (:meth:`Slot.open_batch`, done by
:class:`~rules.ruleset.RuleSet` for the evaluator), the watchdog charges the CPU
the thread used since its previous tick to the rule running at this tick
(``box[0] - box[2]``: the rule's index in the set). That is how a sampling
profiler works: each rule's charge is an unbiased estimate of the CPU it used,
noisy by about one tick, which is negligible next to a 1 s budget. When one
rule's charge reaches the batch budget the watchdog records its index in
``slot.over`` and interrupts it; the evaluator stops the batch after that profile,
confirms and quarantines (engine/evaluate/evaluation.py, engine/evaluate/worker.py). The same
charges feed the ``kvadrupel_rule_cpu_seconds_total`` metric, so operators see
what each rule costs.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from base.errors import RuleTimeout

__all__ = [
    "BudgetExceeded",
    "Slot",
    "clear_async_exc",
    "current_slot",
    "wake_watchdog",
]


class BudgetExceeded(BaseException):  # noqa: N818 - it is a signal, not an error
    """Injected into a rule that exceeded its budget.

    A ``BaseException`` on purpose: rule code may only catch a fixed list of
    ``Exception`` subclasses (rules/guards.py ``CATCHABLE``), so it cannot swallow it.
    """


# Own prototypes rather than ``ctypes.pythonapi.PyThreadState_SetAsyncExc``: that
# attribute is shared, and another library setting its ``argtypes`` would change
# ours. PYFUNCTYPE keeps the GIL during the call (required by this API).
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)

MIN_TICK_S = 0.002
MAX_TICK_S = 0.010
IDLE_AFTER_S = 1.0  # the watchdog parks itself after this long with nothing armed


def _cpu_clock(tid: int) -> int | None:
    """The CPU-time clock of thread ``tid`` (a ``threading.get_ident()``), if any."""
    try:
        return time.pthread_getcpuclockid(tid)
    except (AttributeError, OSError):  # no per-thread CPU clocks here: wall time
        return None


class Slot:
    """Per-thread evaluation state shared by the evaluator, the guards and the watchdog.

    ``box[0]``: the sequence number of the rule running now (0 = none);
    ``box[1]``: its budget in seconds; ``box[2]``: the sequence number of the
    profile's first rule (so ``box[0] - box[2]`` is the rule's index in its set).
    ``profile``/``owned`` serve the write guard (rules/guards.py): the profile being
    evaluated and, computed on the first write attempt only, the ids of its
    containers. ``cost``/``over``/``batch_s``: the open batch, if any (see the
    module docstring).
    """

    __slots__ = (
        "box",
        "tid",
        "clock",
        "seq",
        "fired_seq",
        "seen_seq",
        "seen_at",
        "profile",
        "owned",
        "cost",
        "over",
        "batch_s",
        "last_cpu",
        "__weakref__",
    )

    def __init__(self, tid: int) -> None:
        # [seq: int, budget_s: float, first seq: int]: a list (arming is one item
        # store, see the module docstring), and a list type has no per-item types
        self.box: list[Any] = [0, 0.05, 0]
        self.tid = tid
        self.clock = _cpu_clock(tid)
        self.seq = 0  # last sequence number handed out (evaluator side)
        self.fired_seq = 0  # last sequence number the watchdog interrupted
        self.seen_seq = 0  # watchdog side: the number it saw last, and the CPU time then
        self.seen_at = 0.0
        self.profile: object = None
        self.owned: set[int] | None = None
        self.cost: list[float] | None = None  # CPU seconds charged per rule index
        self.over = -1  # index of the rule that spent the batch budget, else -1
        self.batch_s = 0.0
        self.last_cpu = -1.0  # the thread's CPU time at the watchdog's last look

    def now(self) -> float:
        """The thread's CPU time in seconds (wall time where there is no CPU clock)."""
        if self.clock is None:
            return time.monotonic()
        return time.clock_gettime(self.clock)

    def open_batch(self, n_rules: int, budget_s: float) -> None:
        """Start charging CPU to the rules (by index) of the set evaluated next."""
        self.over = -1
        self.batch_s = budget_s
        self.last_cpu = -1.0
        self.cost = [0.0] * n_rules

    def close_batch(self) -> list[float]:
        """Stop charging; return the CPU seconds charged to each rule index."""
        cost, self.cost = self.cost, None
        return cost or []


# ``clear_async_exc(tid, None)`` drops a pending interrupt of thread ``tid``. It is
# the C function itself, not a Python wrapper: calling it opens no Python frame,
# so no interrupt can be raised between the call site and the clearing.
clear_async_exc = _clear_async_exc


def _fire(slot: Slot, seq: int) -> None:
    # No bytecode boundary between the check and the call (the interpreter only
    # checks for a GIL drop request at function entry, loop back-edges and after
    # calls), so the evaluator cannot move on in between: see the module docstring.
    if slot.box[0] == seq:
        slot.fired_seq = seq
        _set_async_exc(slot.tid, BudgetExceeded)


class _Watchdog:
    def __init__(self) -> None:
        self.slots: weakref.WeakSet[Slot] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.idle = False
        self.wake_event = threading.Event()

    def register(self, slot: Slot) -> None:
        with self.lock:
            self.slots.add(slot)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="rules-watchdog", daemon=True)
                self.thread.start()

    def wake(self) -> None:
        self.wake_event.set()

    def _run(self) -> None:
        quiet_since = time.monotonic()
        while True:
            tick = MAX_TICK_S
            active = False
            for slot in list(self.slots):
                box = slot.box
                seq = box[0]
                cost = slot.cost
                if not seq and cost is None:
                    continue
                try:
                    now = slot.now()
                except OSError:  # the thread is gone
                    continue
                if cost is not None:
                    self._charge(slot, cost, seq, now)
                if not seq:
                    continue
                active = True
                budget = box[1]
                tick = min(tick, max(MIN_TICK_S, budget / 5))
                if seq != slot.seen_seq:
                    slot.seen_seq = seq
                    slot.seen_at = now
                elif now - slot.seen_at >= budget:
                    # Again at every tick until the rule is gone: an interrupt can be
                    # lost (see "Races" in the module docstring).
                    _fire(slot, seq)
            if active:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > IDLE_AFTER_S:
                # Publish "idle" first, then look again: an evaluator that armed before
                # we published is seen by the second look; one that arms later reads
                # idle=True and wakes us (RuleSet.evaluate checks it after arming).
                self.idle = True
                if not any(s.box[0] for s in list(self.slots)):
                    self.wake_event.wait()
                self.wake_event.clear()
                self.idle = False
                for slot in list(self.slots):
                    slot.last_cpu = -1.0  # what ran while we slept is nobody's charge
                quiet_since = time.monotonic()
                continue
            time.sleep(tick)

    @staticmethod
    def _charge(slot: Slot, cost: list[float], seq: int, now: float) -> None:
        """Charge the CPU used since the last look to the rule running now."""
        last, slot.last_cpu = slot.last_cpu, now
        if not seq or last < 0:
            return
        i = seq - slot.box[2]
        if 0 <= i < len(cost):
            spent = cost[i] = cost[i] + (now - last)
            if spent >= slot.batch_s and slot.over < 0:
                slot.over = i
                _fire(slot, seq)

    def _after_fork(self) -> None:
        # The thread does not survive fork(); slots of other threads are dead.
        self.thread = None
        self.slots = weakref.WeakSet()
        self.lock = threading.Lock()
        self.idle = False
        self.wake_event = threading.Event()


WATCHDOG = _Watchdog()
_tls = threading.local()


def _reset_after_fork() -> None:
    global _tls
    _tls = threading.local()
    WATCHDOG._after_fork()


os.register_at_fork(after_in_child=_reset_after_fork)


def current_slot() -> Slot:
    """The calling thread's :class:`Slot` (created and registered on first use)."""
    try:
        slot: Slot = _tls.slot
        return slot
    except AttributeError:
        slot = Slot(threading.get_ident())
        _tls.slot = slot
        WATCHDOG.register(slot)
        return slot


def wake_watchdog() -> None:
    """Wake the watchdog if it parked itself (call after arming a slot)."""
    if WATCHDOG.idle:
        WATCHDOG.wake()


def call_with_budget(
    fn: Callable[[Any, Any], Any],
    profile: Any,
    ctx: Any,
    budget_s: float | None,
    what: str = "rule",
) -> Any:
    """Call ``fn(profile, ctx)`` with the profile protected by the write guard and,
    when ``budget_s`` is set, interrupted after that many seconds.

    Raises :class:`~base.errors.RuleTimeout` on timeout. The slow, general
    path (``CompiledRule.match``); RuleSet inlines the same protocol.
    """
    slot = current_slot()
    box = slot.box
    if box[0]:
        # Nested call inside an evaluation already under a budget: that one applies.
        return fn(profile, ctx)
    saved = slot.profile, slot.owned
    slot.profile, slot.owned = profile, None
    try:
        if not budget_s:
            return fn(profile, ctx)
        seq = slot.seq = slot.seq + 1
        tid = slot.tid
        box[1] = budget_s
        box[2] = seq + 1  # a lone rule, not one of an open batch's set: charge nobody
        error: BaseException | None = None
        result = None
        # The interrupt may land anywhere in the outer ``try`` (see the module
        # docstring). Its handler disarms, then clears, before any bytecode that
        # could let another one in.
        try:
            box[0] = seq
            wake_watchdog()
            try:
                result = fn(profile, ctx)
            except BudgetExceeded:
                raise
            except BaseException as exc:  # re-raised below, once disarmed
                error = exc
            box[0] = 0
            if slot.fired_seq == seq:
                _clear_async_exc(tid, None)
        except BudgetExceeded:
            box[0] = 0
            _clear_async_exc(tid, None)
            raise RuleTimeout(f"{what} exceeded its {budget_s * 1000:g} ms budget") from None
        if error is not None:
            raise error
        return result
    finally:
        slot.profile, slot.owned = saved
