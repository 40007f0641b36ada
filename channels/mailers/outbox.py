"""The embedded mailer: one RFC 5322 ``.eml`` file per message in a folder.

Files are named ``<UTC timestamp>-<message id>.eml`` so a directory listing is in
send order, and written atomically (a hidden temporary file in the same folder,
then ``os.replace``): a reader never sees a half-written message. Lines end in
CRLF, as on the wire. :func:`read_outbox` parses them back.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

from channels.mail import Email, Mailer, SendResult, envelope_address, parse_message, render_message

__all__ = ["OutboxMailer", "read_outbox"]

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._@+=-]+")
_MAX_ID_IN_NAME = 120


class OutboxMailer(Mailer):
    def __init__(
        self,
        directory: str | os.PathLike[str],
        mail_from: str = "Kvadrupel <noreply@kvadrupel.local>",
        *,
        fsync: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.mail_from = mail_from
        self.fsync = fsync
        self._domain = envelope_address(mail_from)[1]

    async def send_many(self, emails: Sequence[Email]) -> list[SendResult]:
        if not emails:
            return []
        # One thread hop for the whole batch: file I/O must not block the loop.
        return await asyncio.to_thread(self._write_all, list(emails))

    async def aclose(self) -> None:
        return None

    # -- worker thread -------------------------------------------------------
    def _write_all(self, emails: list[Email]) -> list[SendResult]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = f"outbox {self.directory}: {exc}"
            return [SendResult(e, ok=False, error=error) for e in emails]
        results = [self._write_one(e) for e in emails]
        if self.fsync and any(r.ok for r in results):
            _fsync_dir(self.directory)
        return results

    def _write_one(self, mail: Email) -> SendResult:
        now = datetime.now(UTC)
        try:
            msg = render_message(mail, self.mail_from, domain=self._domain, date=now)
        except (ValueError, TypeError, UnicodeError) as exc:
            return SendResult(mail, ok=False, permanent=True, error=f"invalid message: {exc}")
        data = msg.data
        msgid = _UNSAFE_NAME.sub("_", msg.message_id.strip("<> "))[:_MAX_ID_IN_NAME]
        final = self.directory / f"{now:%Y%m%dT%H%M%S.%fZ}-{msgid}.eml"
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".eml", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    if self.fsync:
                        fh.flush()
                        os.fsync(fh.fileno())
                os.replace(tmp, final)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        except OSError as exc:  # disk full, permissions: may clear up, so transient
            return SendResult(mail, ok=False, error=f"outbox write failed: {exc}")
        return SendResult(mail, ok=True)


def read_outbox(directory: str | os.PathLike[str]) -> list[EmailMessage]:
    """Every message in the outbox folder, oldest first; [] if there is no folder."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return [
        parse_message(path.read_bytes())  # CRLF on disk, LF in Python
        for path in sorted(folder.glob("*.eml"))
        if not path.name.startswith(".")
    ]


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable. Not possible on every platform/filesystem.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
