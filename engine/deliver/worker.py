"""The delivery worker: rule results → banners, e-mail and push.

Per batch of results (keyed by user, so one user's results arrive in order):

* **Banners** are level-triggered: an ``enter`` stores the banner of the rule's
  episode, an ``exit`` removes it; both idempotent. A banner whose ``expires_at``
  has passed, or that the user opted out of (channel ``banner`` or the rule's
  category), is not shown. Expired banners are removed by a periodic chore.
* **Episodes** are recorded in the user's shard (channels/episodes.py) with the
  why-data: rule version, as-of date, the profile fields the rule read.
* **Holdouts** (channels/holdouts.py): an ``enter`` of a user held out of the rule
  (its holdout share) or in the installation's global control group records a
  *ghost* episode (arm ``holdout`` / ``control``) and nothing else: no banner, no
  ledger claim, so no e-mail, push or retry. Due messages of users held out since
  their episode started are closed ``suppressed``.
* **Content variants** (channels/variants.py): the evaluator rendered the user's
  variant; its key goes into the banner row, the episode (ghosts too) and the
  ledger row's payload.
* **E-mail and push** are edge-triggered: an ``enter`` claims the ledger row
  (user, rule, episode, channel) and only the claimer goes on. Before every send
  attempt the channel policy (channels/policy.py) applies the user's
  preferences, quiet hours and the frequency cap: the message is sent, held
  (quiet hours, deferred by the cap), or closed unsent (opted out, dropped by
  the cap). An ``exit`` cancels its episode's unsent messages.
* Transient failures stay in the ledger and are retried from it with backoff
  and jitter; permanent ones and the ``max_attempts``-th are the dead letter.
  Push tokens the provider calls unregistered are removed from the profile by
  an ordinary ingest event (``unset devices.<id>.push_token``).

Due ledger rows (retries, held messages, claims of a crashed worker) and banner
expiries are handled every ``chore_interval_s`` — between batches under load,
and when the topic is idle.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from typing import Any

import orjson

from base import metrics
from base.clock import SYSTEM
from channels.episodes import EpisodeStart, end_episodes, expire_due, start_episodes
from channels.goals import Conversion, Exposure, record_conversions, record_exposures
from channels.holdouts import Arms
from channels.ledger import Claim, Ledger, Outcome
from channels.mail import Email, Mailer
from channels.policy import ChannelPolicy, Decision
from channels.preferences import ALLOW_ALL, Preferences, load_preferences
from channels.push import Push, Pusher
from channels.unsubscribe import Unsubscriber
from engine.batch import BatchWorker
from engine.bus import Bus, Consumer, Message
from engine.messages import Convert, Enter, Exit, MessageError, dead_letter, decode_result
from shards.router import MAX_USER_ID
from shards.shardset import ShardSet
from shards.store import BannerChange

__all__ = ["DeliveryWorker"]

log = logging.getLogger("kvadrupel.deliver")

_FINAL = {"suppress": "suppressed", "drop": "dropped"}


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


class DeliveryWorker(BatchWorker):
    name = "deliver"
    poll_max = 1000

    def __init__(self, consumer: Consumer, bus: Bus, shards: ShardSet, ledger: Ledger,
                 mailer: Mailer, *, pusher: Pusher | None = None,
                 policy: ChannelPolicy | None = None, unsubscriber: Unsubscriber | None = None,
                 clock: Callable[[], datetime] | None = None,
                 on_banners: Callable[[list[int]], None] | None = None,
                 chore_interval_s: float = 1.0, due_batch: int = 500,
                 send_chunk: int = 200, arms: Arms | None = None) -> None:
        super().__init__(consumer)
        self.bus = bus
        self.shards = shards
        self.ledger = ledger
        self.mailer = mailer
        self.pusher = pusher
        self.policy = policy or ChannelPolicy(caps={}, quiet=None)
        self.unsubscriber = unsubscriber
        self.clock = clock or SYSTEM.now
        self.on_banners = on_banners
        # Holdouts and the global control group (None: everybody is treated).
        self.arms = arms
        self.chore_interval_s = chore_interval_s
        self.due_batch = due_batch
        # Sent messages are recorded per chunk: a crash resends at most one chunk
        # (with the same Message-ID / collapse key), not a whole batch.
        self.send_chunk = max(1, send_chunk)
        self.loop = asyncio.new_event_loop()
        # Records sent chunks in the ledger while the next chunk is being sent.
        self._recorder = ThreadPoolExecutor(1, thread_name_prefix="deliver-record")
        self.sent = 0
        self.failed = 0
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (channel, outcome) -> n
        self._last_chores = 0.0

    # -- results ----------------------------------------------------------------------
    def process(self, batch: list[Message]) -> None:
        now = self.clock()
        # Banner changes per shard in message order (an enter then an exit of the same
        # episode must end without the banner); shows are checked against preferences
        # once those are loaded: (shard, index in that shard's list, category).
        changes: dict[int, list[BannerChange]] = {}
        shows: list[tuple[int, int, str | None]] = []
        starts: dict[int, list[EpisodeStart]] = {}
        ends: dict[int, list[tuple[int, str, int]]] = {}
        candidates: list[Claim] = []
        ended: set[tuple[int, str, int]] = set()
        exposures: dict[int, list[Exposure]] = {}
        conversions: dict[int, list[Conversion]] = {}
        results: list[tuple[Enter | Exit | Convert, date]] = []
        for msg in batch:
            try:
                r = decode_result(msg.value)
                as_of = date.fromisoformat(r.as_of)
                if not 0 < r.user_id <= MAX_USER_ID:
                    raise MessageError(f"user id {r.user_id} out of range")
            except ValueError as exc:  # MessageError, or a bad date
                log.error("dead-lettering malformed result at %s/%d@%d: %s",
                          msg.topic, msg.partition, msg.offset, exc)
                source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
                self.bus.publish(self.bus.topic("results.dlq"),
                                 dead_letter(str(exc), msg.value, source), key=msg.key)
                continue
            results.append((r, as_of))
        # Holdouts and the global control group (channels/holdouts.py): the one place
        # where a rule's result turns into deliveries, so every path (nightly runs,
        # campaigns, ingest re-evaluation) shares it.
        enters = [(r.user_id, r.rule, r.version) for r, _ in results if type(r) is Enter]
        arms = iter(self.arms.arms(enters) if self.arms is not None and enters
                    else ["treatment"] * len(enters))
        for r, as_of in results:
            if isinstance(r, Convert):
                # The rule's goal held within the window (rules/goals.py): counted
                # once per episode, for the arm its exposure recorded.
                try:
                    started = date.fromisoformat(r.started)
                except ValueError:
                    log.error("ignoring a conversion with a malformed start date: %r", r.started)
                    continue
                conversions.setdefault(self.shards.router.shard_of(r.user_id), []).append(
                    Conversion(r.rule, r.user_id, r.episode, started, as_of))
                continue
            uid, rule, episode, version, priority = (r.user_id, r.rule, r.episode, r.version,
                                                     r.priority)
            shard = self.shards.router.shard_of(uid)
            if type(r) is Exit:
                changes.setdefault(shard, []).append(
                    BannerChange(uid, rule, episode, version, priority, as_of, None))
                ends.setdefault(shard, []).append((uid, rule, episode))
                ended.add((uid, rule, episode))
                continue
            assert type(r) is Enter
            arm = next(arms)
            exposures.setdefault(shard, []).append(
                Exposure(rule, uid, episode, version, arm, as_of, r.variant))
            banner = r.banner
            expires = _parse_ts(banner.get("expires_at")) if banner else None
            if arm != "treatment":
                # A ghost episode: recorded like any other, nothing shown or sent (and
                # no banner of an earlier episode left behind).
                self._count("any", arm)
                changes.setdefault(shard, []).append(
                    BannerChange(uid, rule, episode, version, priority, as_of, None))
                starts.setdefault(shard, []).append(
                    EpisodeStart(uid, rule, episode, version, as_of, r.lang, _why(r), expires,
                                 r.run_id, arm, r.variant))
                continue
            if banner is not None and r.variant is not None:
                banner = {**banner, "variant": r.variant}
            if banner is not None and (expires is None or expires > now):
                per = changes.setdefault(shard, [])
                shows.append((shard, len(per), banner.get("category")))
                per.append(BannerChange(uid, rule, episode, version, priority, as_of, banner))
            elif episode > 1 or banner is not None:
                # Nothing to show (an e-mail-only rule, or already expired): an older
                # episode's banner must not linger either.
                changes.setdefault(shard, []).append(BannerChange(
                    uid, rule, episode if banner is not None else episode - 1, version, priority,
                    as_of, None))
            starts.setdefault(shard, []).append(
                EpisodeStart(uid, rule, episode, version, as_of, r.lang, _why(r), expires,
                             r.run_id, "treatment", r.variant))
            base = {"as_of": r.as_of, "tz": r.tz, "lang": r.lang, "user_lang": r.user_lang,
                    "why": r.why}
            if r.variant is not None:
                base["variant"] = r.variant
            email = r.email
            if email and email.get("to"):
                candidates.append(Claim(uid, rule, episode, "email", version, r.run_id,
                                        {**email, **base}))
            push = r.push
            if self.pusher is not None and push and push.get("tokens"):
                candidates.append(Claim(uid, rule, episode, "push", version, r.run_id,
                                        {**push, **base}))

        users = {c.user_id for c in candidates} | {changes[sh][i].user_id for sh, i, _ in shows}
        prefs = load_preferences(self.shards, users) if users else {}
        for shard, i, category in shows:
            ch = changes[shard][i]
            ok, _ = prefs.get(ch.user_id, ALLOW_ALL).allows("banner", category)
            if not ok:
                self._count("banner", "suppressed")
                changes[shard][i] = BannerChange(ch.user_id, ch.rule_key, ch.episode, ch.version,
                                                 ch.priority, ch.as_of, None)
        changed: list[int] = []
        for shard, chs in changes.items():
            changed += self.shards.stores[shard].apply_banner_changes(chs)
        if changed and self.on_banners:
            self.on_banners(changed)
        for shard, items in starts.items():
            start_episodes(self.shards.stores[shard], items, now)
        for shard, ending in ends.items():
            end_episodes(self.shards.stores[shard], ending, now)
        for shard, exposed in exposures.items():
            record_exposures(self.shards.stores[shard], exposed)
        for shard, converted in conversions.items():
            n = record_conversions(self.shards.stores[shard], converted)
            if n:
                self._count("goal", "converted", n)

        won = self.ledger.claim(
            [c for c in candidates if (c.user_id, c.rule_key, c.episode) not in ended]
        )
        if ended:
            n = self.ledger.cancel_episodes(ended)
            if n:
                self._count("any", "cancelled", n)
        self._dispatch(won, prefs, now)
        self.bus.flush()
        self._chores()

    def idle(self) -> None:
        self._chores()

    # -- periodic chores --------------------------------------------------------------
    def _chores(self, force: bool = False) -> None:
        mono = time.monotonic()
        if not force and mono - self._last_chores < self.chore_interval_s:
            return
        self._last_chores = mono
        for _ in range(10):  # bounded: results must keep flowing
            due = self.ledger.due(self.due_batch)
            if not due:
                break
            if self.arms is not None:
                due = self._held_out(self.arms, due)
            prefs = load_preferences(self.shards, {c.user_id for c in due})
            self._dispatch(due, prefs, self.clock())
            self.bus.flush()
            if len(due) < self.due_batch:
                break
        now = self.clock()
        for store in self.shards.stores:
            changed = expire_due(store, now)
            if changed:
                self._count("banner", "expired", len(changed))
                if self.on_banners:
                    self.on_banners(changed)

    def _held_out(self, arms: Arms, due: list[Claim]) -> list[Claim]:
        """Close the due messages (retries, held ones) of users now held out — the
        global control group grew since the episode started — and keep the rest."""
        now = arms.arms((c.user_id, c.rule_key, c.version) for c in due)
        close = [(c, "suppressed", "global control group" if arm == "control" else "holdout")
                 for c, arm in zip(due, now, strict=True) if arm != "treatment"]
        if not close:
            return due
        self.ledger.finish(close)
        for c, _, _ in close:
            self._count(c.channel, "suppressed")
        gone = {c.key for c, _, _ in close}
        return [c for c in due if c.key not in gone]

    def run_chores(self) -> None:
        """Handle what is due now (tests, and a worker's last act before stopping)."""
        self._chores(force=True)

    # -- the policy and sending ---------------------------------------------------------
    def _dispatch(
        self, claims: Sequence[Claim], prefs: dict[int, Preferences], now: datetime
    ) -> None:
        if not claims:
            return
        decisions = self.policy.decide(claims, now, prefs, self.ledger.recent_sends)
        hold: list[tuple[Claim, datetime, str]] = []
        close: list[tuple[Claim, str, str]] = []
        send: list[Claim] = []
        for d in decisions:
            if d.action == "send":
                send.append(d.claim)
            elif d.action == "hold":
                assert d.until is not None
                hold.append((d.claim, d.until, d.reason or "held"))
                self._count(d.claim.channel, _held_label(d))
            else:
                close.append((d.claim, _FINAL[d.action], d.reason or d.action))
                self._count(d.claim.channel, _FINAL[d.action])
        self.ledger.hold(hold)
        self.ledger.finish(close)
        self._send(send)

    def _send(self, claims: list[Claim]) -> None:
        if not claims:
            return
        # Chunks of half ``send_chunk``, two in flight: while one chunk's outcomes are
        # recorded (in a thread: the ledger's database), the next is being sent, and
        # the one after is queued for the connections as they come free, so the SMTP
        # connections neither wait for the ledger nor drain at each chunk's end. Sent
        # but unrecorded are at most the two chunks: ``send_chunk`` messages, the
        # most a crash can resend, as before.
        size = max(1, self.send_chunk // 2)
        chunks = [claims[i:i + size] for i in range(0, len(claims), size)]
        self.loop.run_until_complete(self._send_chunks(chunks))

    async def _send_chunks(self, chunks: list[list[Claim]]) -> None:
        loop = asyncio.get_running_loop()
        sending: dict[int, asyncio.Future[list[Outcome]]] = {}

        def start(j: int) -> None:
            if j < len(chunks):
                sending[j] = asyncio.ensure_future(self._send_chunk(chunks[j]))

        start(0)
        start(1)
        try:
            for i in range(len(chunks)):
                outcomes = await sending.pop(i)
                await loop.run_in_executor(self._recorder, self.ledger.record, outcomes)
                start(i + 2)
        finally:
            for task in sending.values():  # a failure: stop the rest, and unrecorded
                task.cancel()             # sends are retried from the ledger
            await asyncio.gather(*sending.values(), return_exceptions=True)

    async def _send_chunk(self, claims: list[Claim]) -> list[Outcome]:
        emails = [c for c in claims if c.channel == "email"]
        pushes = [c for c in claims if c.channel == "push"]
        other = [c for c in claims if c.channel not in ("email", "push")]
        outcomes: list[Outcome] = [
            Outcome(c, ok=False, permanent=True, error=f"no channel {c.channel!r}") for c in other
        ]
        built: list[tuple[Claim, Email | str]] = [(c, self._email(c)) for c in emails]
        mails = [m for _, m in built if isinstance(m, Email)]
        push_msgs: list[tuple[Claim, str, Push]] = []
        for c in pushes:
            push_msgs += [(c, dev, p) for dev, p in self._pushes(c)]

        mail_task = self.mailer.send_many(mails) if mails else _none()
        push_task = (self.pusher.send_many([p for _, _, p in push_msgs])
                     if push_msgs and self.pusher is not None else _none())
        mail_results, push_results = await asyncio.gather(mail_task, push_task)
        it = iter(mail_results)
        for c, m in built:
            if isinstance(m, str):  # the message could not be built: permanent
                outcomes.append(Outcome(c, ok=False, permanent=True, error=m))
                continue
            res = next(it)
            outcomes.append(Outcome(c, res.ok, res.permanent, res.error))
        outcomes += self._push_outcomes(pushes, push_msgs, push_results)
        for o in outcomes:
            if o.ok:
                self.sent += 1
                label = "sent"
            else:
                self.failed += 1
                attempts = o.claim.attempts + 1
                final = o.permanent or attempts >= self.ledger.max_attempts
                label = ("permanent_failure" if o.permanent else
                         "dead_letter" if final else "transient_failure")
            self._count(o.claim.channel, label)
        return outcomes

    def _email(self, c: Claim) -> Email | str:
        p: dict[str, Any] = c.payload
        text, html = p.get("text", ""), p.get("html")
        headers = {"X-Kvadrupel-Rule": f"{c.rule_key}/v{c.version}",
                   "X-Kvadrupel-Episode": str(c.episode)}
        if self.unsubscriber is not None:
            url = self.unsubscriber.url(c.user_id, "email", c.category)
            headers |= self.unsubscriber.headers(url)
            if isinstance(text, str) and (html is None or isinstance(html, str)):
                text, html = self.unsubscriber.add_footer(text, html, url,
                                                          p.get("user_lang") or p.get("lang"))
        try:
            return Email(
                to=p["to"],
                subject=p.get("subject", ""),
                text=text,
                html=html,
                headers=headers,
                message_id=f"<{c.user_id}.{c.rule_key}.{c.episode}@kvadrupel>",
            )
        except (KeyError, TypeError) as exc:
            return f"cannot build the e-mail: {exc}"

    @staticmethod
    def _pushes(c: Claim) -> list[tuple[str, Push]]:
        p = c.payload
        tokens = p.get("tokens") or {}
        mid = f"{c.user_id}.{c.rule_key}.{c.episode}"
        data = {
            "rule": c.rule_key,
            "banner_id": f"{c.rule_key}.{c.episode}",
            "user_id": str(c.user_id),
        }
        return [(dev, Push(token=tok, title=str(p.get("title", "")), body=str(p.get("body", "")),
                           link=str(p.get("link") or ""), data=data, message_id=mid))
                for dev, tok in tokens.items() if isinstance(tok, str)]

    def _push_outcomes(self, claims: list[Claim], msgs: list[tuple[Claim, str, Push]],
                       results: list[Any]) -> list[Outcome]:
        per: dict[tuple[int, str, int, str], list[tuple[str, Any]]] = {}
        for (c, dev, _), res in zip(msgs, results, strict=True):
            per.setdefault(c.key, []).append((dev, res))
        out: list[Outcome] = []
        for c in claims:
            rs = per.get(c.key, [])
            dead = [(dev, r) for dev, r in rs if r.unregistered]
            for dev, r in dead:
                self._unregister(c.user_id, dev, r.push.token)
            if any(r.ok for _, r in rs):
                out.append(Outcome(c, ok=True))
                continue
            retry = {dev: r.push.token for dev, r in rs if not r.ok and not r.permanent}
            errors = "; ".join(sorted({str(r.error) for _, r in rs if r.error}))[:1000]
            if retry:
                out.append(Outcome(c, ok=False, permanent=False, error=errors,
                                   payload={**c.payload, "tokens": retry}))
            else:
                out.append(Outcome(c, ok=False, permanent=True,
                                   error=errors or "no registered device"))
        return out

    def _unregister(self, user_id: int, device: str, token: str) -> None:
        digest = hashlib.sha256(token.encode()).hexdigest()[:24]
        event = {"event_id": f"kvd-push-unregistered-{digest}", "user_id": user_id,
                 "unset": [f"devices.{device}.push_token"]}
        self.bus.publish(self.bus.topic("events"), orjson.dumps(event), key=str(user_id).encode())
        self._count("push", "unregistered")

    def _count(self, channel: str, outcome: str, n: int = 1) -> None:
        self.outcomes[(channel, outcome)] += n
        metrics.DELIVERIES.labels(channel, outcome).inc(n)

    def close(self) -> None:
        super().close()
        try:
            self.loop.run_until_complete(self.mailer.aclose())
            if self.pusher is not None:
                self.loop.run_until_complete(self.pusher.aclose())
        finally:
            self.loop.close()
            self._recorder.shutdown()


async def _none() -> list[Any]:
    return []


def _held_label(d: Decision) -> str:
    return "held_quiet_hours" if d.reason == "quiet hours" else "deferred_cap"


def _why(r: Enter) -> dict[str, Any] | None:
    why = r.why
    if not isinstance(why, dict):
        return None
    return {"rule": r.rule, "version": r.version, "as_of": r.as_of, **why}
