"""E-mails per second through SmtpMailer, against the bare aiosmtplib ceiling.

    .venv/bin/python bench/bench_mail.py [--messages 2000] [--connections 8] [--rounds 3]

A local aiosmtpd server runs in a child process (its own interpreter and core,
so it does not share this process's GIL) and only counts what it receives. In
this process, with the same messages and the same number of connections:

* ``kvadrupel``: ``SmtpMailer.send_many`` (renders the messages itself, pools
  and fans out the connections, classifies the results);
* ``bare``: no Kvadrupel code: N ``aiosmtplib.SMTP`` connections draining one
  queue, each message built as a stdlib ``EmailMessage`` (the same headers and
  parts) and sent with ``send_message``, the way aiosmtplib documents it.

* ``wire``: like ``bare``, but the messages are flattened to bytes *before* the
  timer starts and sent with ``sendmail``: the protocol alone, the ceiling for
  any client on these connections.

"bare" is the ceiling of plain aiosmtplib usage: Kvadrupel writes the MIME text
itself instead of going through the stdlib's EmailMessage/generator (see
channels/mail.py), which is most of a send's CPU, so that ratio can be above 1;
kvadrupel / wire says what building the messages and the mailer still cost.

Both open their connections inside the timed region. Each round runs both, in
alternating order; the median round is reported, with the client's CPU time per
message (the part Kvadrupel adds to), and the ratio kvadrupel / bare.
"""

from __future__ import annotations

import argparse
import asyncio
import email.policy
import email.utils
import multiprocessing as mp
import socket
import statistics
import sys
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib  # noqa: E402

from channels.mail import Email  # noqa: E402
from channels.mailers.smtp import SmtpMailer  # noqa: E402

MAIL_FROM = "Kvadrupel <noreply@kvadrupel.test>"
SENDER = "noreply@kvadrupel.test"


# -- the server (child process) ---------------------------------------------------

def serve(port_out, counter, stop) -> None:  # noqa: ANN001 - multiprocessing proxies
    from aiosmtpd.controller import Controller

    class Counting:
        async def handle_DATA(self, server, session, envelope):  # noqa: ANN001
            with counter.get_lock():
                counter.value += 1
            return "250 OK"

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    controller = Controller(
        Counting(), hostname="127.0.0.1", port=port, server_hostname="bench-smtp"
    )
    controller.start()
    port_out.value = port
    stop.wait()
    controller.stop()


class SmtpSink:
    """The counting aiosmtpd server of :func:`serve`, in a spawned child process.

    ``with SmtpSink() as sink`` (or ``start()`` ... ``close()``): ``sink.host``,
    ``sink.port``, ``sink.url``, and ``sink.received`` (messages accepted so far).
    """

    host = "127.0.0.1"

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> SmtpSink:
        ctx = mp.get_context("spawn")
        self._port, self._counter, self._stop = ctx.Value("i", 0), ctx.Value("q", 0), ctx.Event()
        self._server = ctx.Process(target=serve, args=(self._port, self._counter, self._stop),
                                   daemon=True)
        self._server.start()
        deadline = time.monotonic() + 20
        while self._port.value == 0:
            if time.monotonic() > deadline or not self._server.is_alive():
                raise SystemExit("the aiosmtpd server did not start")
            time.sleep(0.05)
        self.port = self._port.value
        self.url = f"smtp://{self.host}:{self.port}"
        return self

    @property
    def received(self) -> int:
        return self._counter.value

    def close(self) -> None:
        self._stop.set()
        self._server.join(10)


# -- the messages -------------------------------------------------------------------

def make_emails(n: int, tag: str) -> list[Email]:
    text = "Hello {name},\n\n" + "Here is what changed this week in your account.\n" * 10
    html = "<html><body><h1>Hello {name}</h1>" + "<p>Something changed.</p>" * 40 + "</body></html>"
    return [
        Email(
            to=f"user{i}@example.com",
            subject=f"Your weekly digest #{i}",
            text=text.format(name=f"user {i}"),
            html=html.format(name=f"user {i}"),
            headers={"X-Kvadrupel-Rule": "weekly-digest"},
            message_id=f"<{tag}-{i}@kvadrupel.test>",
        )
        for i in range(n)
    ]


def stdlib_message(mail: Email) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = MAIL_FROM
    msg["To"] = mail.to
    msg["Subject"] = mail.subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = mail.message_id
    for name, value in mail.headers.items():
        msg[name] = value
    msg.set_content(mail.text)
    if mail.html is not None:
        msg.add_alternative(mail.html, subtype="html")
    return msg


# -- the two clients ----------------------------------------------------------------

async def run_kvadrupel(url: str, emails: list[Email], connections: int) -> int:
    async with SmtpMailer(url, MAIL_FROM, timeout=30, concurrency=connections,
                          local_hostname="bench-client") as mailer:
        results = await mailer.send_many(emails)
    return sum(r.ok for r in results)


async def _pump(host: str, port: int, items: list, connections: int, send) -> int:  # noqa: ANN001
    """Send ``items`` over ``connections`` plain aiosmtplib connections (``send(smtp, item)``)."""
    queue = list(reversed(items))
    sent = 0

    async def worker() -> None:
        nonlocal sent
        smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=30, start_tls=False,
                               local_hostname="bench-client")
        await smtp.connect()
        try:
            while queue:
                await send(smtp, queue.pop())
                sent += 1
        finally:
            await smtp.quit()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return sent


async def run_bare(host: str, port: int, emails: list[Email], connections: int) -> int:
    """The bare client: an EmailMessage per e-mail, then ``send_message``."""
    async def send(smtp: aiosmtplib.SMTP, mail: Email) -> None:
        await smtp.send_message(stdlib_message(mail), sender=SENDER, recipients=[mail.to])

    return await _pump(host, port, emails, connections, send)


async def run_wire(
    host: str, port: int, prepared: list[tuple[str, bytes]], connections: int
) -> int:
    """The ceiling: pre-built wire bytes, ``sendmail`` only."""
    async def send(smtp: aiosmtplib.SMTP, item: tuple[str, bytes]) -> None:
        await smtp.sendmail(SENDER, [item[0]], item[1])

    return await _pump(host, port, prepared, connections, send)


class CarefulBuilder:
    """How a careful aiosmtplib user builds messages fast, without Kvadrupel: the MIME
    skeleton of the template is fixed once (its boundary, part headers), and each
    message is assembled as text from its fields and encoded, no EmailMessage and no
    generator per message. It takes what it is given on trust (ASCII, short lines,
    headers that need no folding); a body that is not, it hands to the stdlib."""

    def __init__(self, mail_from: str) -> None:
        self.mail_from = mail_from
        b = f"=_careful_{uuid.uuid4().hex}"
        self.boundary = b
        part = 'Content-Type: text/{}; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n\r\n'
        self.alt = f'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="{b}"\r\n'
        self.text_part, self.html_part = f"--{b}\r\n" + part.format("plain"), \
            f"--{b}\r\n" + part.format("html")
        self.end = f"--{b}--\r\n"

    def __call__(self, mail: Email) -> bytes:
        text, html = mail.text, mail.html or ""
        if not (text.isascii() and html.isascii() and mail.subject.isascii()) \
                or f"--{self.boundary}" in text + html:
            return stdlib_message(mail).as_bytes(policy=email.policy.SMTP)
        head = "".join((
            f"From: {self.mail_from}\r\nTo: {mail.to}\r\nSubject: {mail.subject}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\nMessage-ID: {mail.message_id}\r\n",
            *(f"{k}: {v}\r\n" for k, v in mail.headers.items()),
        ))
        if mail.html is None:
            body = ('MIME-Version: 1.0\r\nContent-Type: text/plain; charset="utf-8"\r\n'
                    f"Content-Transfer-Encoding: 7bit\r\n\r\n{_crlf(text)}")
        else:
            body = (f"{self.alt}\r\n{self.text_part}{_crlf(text)}\r\n"
                    f"{self.html_part}{_crlf(html)}\r\n{self.end}")
        return (head + body).encode("ascii")


def _crlf(body: str) -> str:
    return body.replace("\r\n", "\n").replace("\n", "\r\n")


async def run_careful(host: str, port: int, emails: list[Email], connections: int) -> int:
    """The careful client: each message assembled as bytes (:class:`CarefulBuilder`)
    inside the timed region, then ``sendmail``."""
    build = CarefulBuilder(MAIL_FROM)

    async def send(smtp: aiosmtplib.SMTP, mail: Email) -> None:
        await smtp.sendmail(SENDER, [mail.to], build(mail))

    return await _pump(host, port, emails, connections, send)


def flattened(emails: list[Email]) -> list[tuple[str, bytes]]:
    return [(m.to, stdlib_message(m).as_bytes(policy=email.policy.SMTP)) for m in emails]


def timed(coro_factory) -> tuple[float, float, int]:  # noqa: ANN001
    wall, cpu = time.perf_counter(), time.process_time()
    ok = asyncio.run(coro_factory())
    return time.perf_counter() - wall, time.process_time() - cpu, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, conns = args.messages, args.connections

    runs: dict[str, list[tuple[float, float, int]]] = {"kvadrupel": [], "bare": [], "wire": []}
    with SmtpSink() as sink:
        host, port, url = sink.host, sink.port, sink.url

        def wire(emails: list[Email]):  # noqa: ANN202
            prepared = flattened(emails)  # before the timer
            return lambda: run_wire(host, port, prepared, conns)

        paths = {
            "kvadrupel": lambda emails: (lambda: run_kvadrupel(url, emails, conns)),
            "bare": lambda emails: (lambda: run_bare(host, port, emails, conns)),
            "wire": wire,
        }
        # Warm-up: imports, first connections, the server's code paths.
        for name, path in paths.items():
            timed(path(make_emails(200, f"warm-{name}")))
        for rnd in range(args.rounds):
            order = list(paths) if rnd % 2 == 0 else list(reversed(paths))
            for name in order:
                before = sink.received
                wall, cpu, ok = timed(paths[name](make_emails(n, f"{name}-{rnd}")))
                time.sleep(0.05)
                arrived = sink.received - before
                if ok != n or arrived != n:
                    raise SystemExit(f"{name}: {ok} ok, {arrived} arrived, of {n}")
                runs[name].append((wall, cpu, ok))

    print(f"{n} messages, {conns} connections, {args.rounds} rounds (median), "
          f"aiosmtpd server in a child process, Python {sys.version.split()[0]}")
    rate = {}
    for name, results in runs.items():
        wall = statistics.median(r[0] for r in results)
        cpu = statistics.median(r[1] for r in results)
        rate[name] = n / wall
        all_rates = ", ".join(f"{n / r[0]:,.0f}" for r in results)
        print(f"  {name:<10} {rate[name]:>8,.0f} e-mails/s"
              f"   client CPU {cpu / n * 1e6:6.0f} us/e-mail   (rounds: {all_rates})")
    print(f"  ratio kvadrupel / bare: {rate['kvadrupel'] / rate['bare']:.2f}"
          f"   kvadrupel / wire: {rate['kvadrupel'] / rate['wire']:.2f}")


if __name__ == "__main__":
    main()
