"""HTTPS to a business's own systems, against real TLS servers on 127.0.0.1: a private CA, a
self-signed certificate, an expired one, one for another host, and mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from estafeta.config import load_config_dict
from estafeta.connectors.http import HttpConnector, new_client_session
from estafeta.connectors.registry import Connectors
from estafeta.connectors.tls import client_context
from estafeta.delivery.outcome import Outcome, OutcomeKind
from estafeta.errors import ConfigError
from estafeta.store.sqlstore import SqlStore
from estafeta.testing.sink import Sink
from tests.certificates import Certificates, Pair, server_context
from tests.conftest import SINK_SECRET, base_config, leased_delivery
from tests.integration.test_worker import Running, settled

PAYLOAD = b'{"id":"evt_1","type":"message.received","data":{}}'
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    shared = new_client_session()
    yield shared
    await shared.close()


@asynccontextmanager
async def https_sink(served: Pair, *, client_ca: Path | None = None) -> AsyncIterator[Sink]:
    """A sink serving HTTPS with `served`; asking for a client certificate `client_ca`
    signed, when given."""
    sink = Sink(secret=SINK_SECRET)
    await sink.start(tls=server_context(served, client_ca=client_ca))
    try:
        yield sink
    finally:
        await sink.stop()


async def deliver(
    url: str,
    session: aiohttp.ClientSession,
    tls: ssl.SSLContext | None = None,
    event_id: str = "evt_1",
) -> Outcome:
    connector = HttpConnector(url=url, secret=SINK_SECRET, timeout_s=5, session=session, tls=tls)
    return await connector.deliver(leased_delivery(PAYLOAD, event_id=event_id))


def assert_tls_failure(outcome: Outcome, reason: str) -> None:
    """Failed as a retryable `tls_error` whose excerpt starts with `reason`, in words that
    are the same in every process (no object address)."""
    assert (outcome.kind, outcome.error_class) == (OutcomeKind.RETRYABLE, "tls_error"), outcome
    assert outcome.response_excerpt.startswith(reason), outcome.response_excerpt
    assert "0x" not in outcome.response_excerpt and "_ssl.c" not in outcome.response_excerpt


# -- the destination's certificate -----------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_private_ca_named_in_tls_ca_file_is_trusted(
    certificates: Certificates, session: aiohttp.ClientSession, host: str
) -> None:
    async with https_sink(certificates.server) as sink:
        url = sink.url.replace("127.0.0.1", host) + "/hooks"
        outcome = await deliver(url, session, client_context(ca_file=str(certificates.ca)))
    assert outcome.kind is OutcomeKind.SUCCESS, outcome
    assert sink.delivered_ids == {"evt_1"} and sink.bad_signatures == []


async def test_a_self_signed_certificate_is_trusted_when_named_itself(
    certificates: Certificates, session: aiohttp.ClientSession
) -> None:
    async with https_sink(certificates.self_signed) as sink:
        tls = client_context(ca_file=str(certificates.self_signed.cert))
        outcome = await deliver(sink.url, session, tls)
    assert outcome.kind is OutcomeKind.SUCCESS, outcome


@pytest.mark.parametrize(
    ("served", "trusting_the_ca", "reason"),
    [
        ("server", False, "certificate not trusted: unable to get local issuer certificate"),
        ("self_signed", False, "certificate not trusted: self-signed certificate"),
        ("expired", True, "certificate expired: certificate has expired"),
        ("wrong_host", True, "hostname mismatch: certificate is not valid for '127.0.0.1'"),
    ],
)
async def test_a_certificate_that_does_not_verify_fails_the_attempt_saying_why(
    certificates: Certificates,
    session: aiohttp.ClientSession,
    served: str,
    trusting_the_ca: bool,
    reason: str,
) -> None:
    tls = client_context(ca_file=str(certificates.ca)) if trusting_the_ca else None
    async with https_sink(getattr(certificates, served)) as sink:
        outcome = await deliver(sink.url, session, tls)
    assert_tls_failure(outcome, reason)
    assert sink.received == []  # nothing was sent to a destination that is not verified


async def test_https_to_a_plain_http_port_is_named(session: aiohttp.ClientSession) -> None:
    sink = Sink()
    await sink.start()
    try:
        outcome = await deliver(sink.url.replace("http://", "https://"), session)
    finally:
        await sink.stop()
    assert_tls_failure(outcome, "TLS handshake failed: wrong version number")


async def test_a_connection_error_to_a_destination_with_its_own_context_reads_the_same(
    certificates: Certificates, session: aiohttp.ClientSession
) -> None:
    # Refused, not resolved, reset before the handshake: aiohttp's text names the context
    # object (`ssl:<ssl.SSLContext object at 0x7f…>`), different in every process and every
    # restart, so `dlq list --summary` would split one outage into as many groups.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"https://127.0.0.1:{port}/hooks"
    excerpts = set()
    for _ in range(2):  # two processes' contexts: two objects
        outcome = await deliver(url, session, client_context(ca_file=str(certificates.ca)))
        assert outcome.error_class == "connection_refused", outcome
        excerpts.add(outcome.response_excerpt)
    [excerpt] = excerpts
    assert "0x" not in excerpt and "SSLContext" not in excerpt, excerpt


# -- mutual TLS ------------------------------------------------------------------------------


async def test_a_client_certificate_is_presented(
    certificates: Certificates, session: aiohttp.ClientSession
) -> None:
    tls = client_context(
        ca_file=str(certificates.ca),
        client_cert=str(certificates.client.cert),
        client_key=str(certificates.client.key),
    )
    async with https_sink(certificates.server, client_ca=certificates.ca) as sink:
        outcome = await deliver(sink.url, session, tls)
    assert outcome.kind is OutcomeKind.SUCCESS, outcome
    assert [r.client_certificate for r in sink.received] == ["hub-client"]


async def test_two_destinations_on_one_host_each_present_their_own_certificate(
    certificates: Certificates, session: aiohttp.ClientSession
) -> None:
    # One pooled session serves every destination: a kept-alive connection opened with one
    # destination's certificate must never carry another's deliveries.
    ca = str(certificates.ca)
    contexts = {
        pair: client_context(ca_file=ca, client_cert=str(pair.cert), client_key=str(pair.key))
        for pair in (certificates.client, certificates.other_client)
    }
    async with https_sink(certificates.server, client_ca=certificates.ca) as sink:
        for n in range(6):
            pair = certificates.client if n % 2 == 0 else certificates.other_client
            outcome = await deliver(sink.url, session, contexts[pair], event_id=f"evt_{n}")
            assert outcome.kind is OutcomeKind.SUCCESS, outcome
    assert [r.client_certificate for r in sink.received] == ["hub-client", "other-client"] * 3


@contextmanager
def alerting_server(context: ssl.SSLContext) -> Iterator[str]:
    """A TLS server as nginx or IIS are: it tells a client whose certificate it refuses why,
    with a TLS alert (asyncio's server drops the connection without one). Answers 200 to a
    client it accepts; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # to see `stopping` soon: a close does not end an accept
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.settimeout(5)
            with context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            ) as tls:
                try:
                    tls.do_handshake()
                    tls.recv(65536)
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                except (ssl.SSLError, OSError):
                    # The alert is sent. Closed at once with the client's request unread, the
                    # socket would send a reset, which can reach the client before the alert
                    # is read: closed as servers do, once the client has hung up.
                    with contextlib.suppress(OSError):
                        tls.shutdown(socket.SHUT_WR)
                        while tls.recv(65536):
                            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stopping.set()
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        (None, "client certificate required by the destination: tlsv13 alert certificate required"),
        ("stranger", "client certificate refused by the destination: tlsv1 alert unknown ca"),
    ],
)
async def test_a_refused_client_certificate_is_named(
    certificates: Certificates, session: aiohttp.ClientSession, client: str | None, reason: str
) -> None:
    pair: Pair | None = getattr(certificates, client) if client else None
    tls = client_context(
        ca_file=str(certificates.ca),
        client_cert=str(pair.cert) if pair else None,
        client_key=str(pair.key) if pair else None,
    )
    with alerting_server(server_context(certificates.server, client_ca=certificates.ca)) as url:
        outcome = await deliver(url, session, tls)
    assert_tls_failure(outcome, reason)


# -- through the configuration and the worker -----------------------------------------------


def tls_config(database_url: str, url: str, **tls: Any) -> dict[str, Any]:
    data = base_config(database_url)
    crm = data["destinations"][0]
    crm.update(url=f"{url}/crm", max_attempts=2, **tls)
    return data


async def test_the_files_are_read_once_when_the_connectors_start(
    certificates: Certificates, tmp_path: Path
) -> None:
    # One context per destination, built at start: not read again per request, so a file
    # removed (or replaced) later changes nothing until a restart.
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certificates.ca.read_bytes())
    async with https_sink(certificates.server, client_ca=certificates.ca) as sink:
        config = load_config_dict(
            tls_config(
                f"sqlite:///{tmp_path}/x.db",
                sink.url,
                tls_ca_file=str(ca),
                tls_client_cert=str(certificates.client.cert),
                tls_client_key=str(certificates.client.key),
            )
        )
        connectors = Connectors(config)
        await connectors.start()
        try:
            ca.unlink()
            crm = connectors.get("crm")
            assert crm is not None
            for n in range(3):
                outcome = await crm.deliver(leased_delivery(PAYLOAD, event_id=f"evt_{n}"))
                assert outcome.kind is OutcomeKind.SUCCESS, outcome
        finally:
            await connectors.close()
    assert [r.client_certificate for r in sink.received] == ["hub-client"] * 3


async def test_a_file_gone_when_the_connectors_start_leaves_no_session_open(
    certificates: Certificates, tmp_path: Path
) -> None:
    # `serve` restarts a crashed worker with new connectors, which read the files again: a
    # file removed meanwhile fails each restart, and must not leave a session open each
    # time (aiohttp's "Unclosed client session" error, once per restart).
    ca = tmp_path / "ca.pem"
    ca.write_bytes(certificates.ca.read_bytes())
    config = load_config_dict(
        tls_config(f"sqlite:///{tmp_path}/x.db", "https://127.0.0.1:1", tls_ca_file=str(ca))
    )
    ca.unlink()
    reported: list[str] = []
    located: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
    try:
        connectors = Connectors(config)
        try:
            await connectors.start()
        except ConfigError as exc:
            located = [issue.location for issue in exc.issues]
        del connectors  # as the crashed worker that held them
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert located == ["destinations[0].tls_ca_file"]
    assert reported == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_delivery_that_dies_of_an_expired_certificate_says_so(
    certificates: Certificates, store: SqlStore, database_url: str
) -> None:
    async with https_sink(certificates.expired) as sink:
        data = tls_config(database_url, sink.url, tls_ca_file=str(certificates.ca))
        hub = Running(store, load_config_dict(data))
        try:
            event_id = await hub.publish()
            view = await settled(store, event_id)
        finally:
            await hub.stop()
    [delivery] = view.deliveries
    assert delivery.state == "dead"
    # What `dlq list` and an event's read show an operator.
    assert delivery.last_error == "tls_error: certificate expired: certificate has expired"
    assert [a.error_class for a in delivery.attempt_log] == ["tls_error", "tls_error"]


async def test_the_default_context_trusts_what_ssl_cert_file_names(
    certificates: Certificates,
) -> None:
    # Without tls_ca_file a destination is verified with the system's store, which OpenSSL
    # reads from SSL_CERT_FILE when it is set (aiohttp loads it once, at import).
    script = textwrap.dedent(
        """
        import asyncio, sys
        from estafeta.connectors.http import HttpConnector, new_client_session
        from tests.conftest import SINK_SECRET, leased_delivery

        async def main() -> None:
            session = new_client_session()
            connector = HttpConnector(
                url=sys.argv[1], secret=SINK_SECRET, timeout_s=5, session=session
            )
            outcome = await connector.deliver(leased_delivery(b"{}"))
            await session.close()
            print(outcome.error_class or "delivered", outcome.response_excerpt[:80])

        asyncio.run(main())
        """
    )

    async def run(url: str, **env: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            url,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            cwd=REPOSITORY,  # where `tests` is importable, wherever pytest was started
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 60)
        finally:
            if process.returncode is None:  # timed out: not left running after the test
                process.kill()
                await process.wait()
        assert process.returncode == 0
        return out.decode().strip()

    async with https_sink(certificates.server) as sink:
        trusted = await run(sink.url, SSL_CERT_FILE=str(certificates.ca))
        untrusted = await run(sink.url)
    assert trusted == "delivered"
    assert untrusted.startswith("tls_error certificate not trusted")
