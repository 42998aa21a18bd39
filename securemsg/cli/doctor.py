"""``securemsg doctor``: why a client can or cannot work, step by step, in plain words.

With an address, one connection is followed from the name to a message: name resolution,
TCP, TLS (version, cipher, ALPN), the server's certificate (subject, names, issuer, days
left), its verification against our CA and host name, the client certificate, the
``welcome``, one round trip and the clock offset. Without one, the local configuration and
certificate files are checked. Diagnosis stops at the first failure, which carries the fix.

Blocking sockets with deadlines: one short-lived connection needs no event loop. The wire
is spoken with the sans-I/O messages and frames, as any client does.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from securemsg.config import ClientConfig, read_token
from securemsg.core.frames import FrameDecoder, encode_frame
from securemsg.core.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Delivery,
    Direct,
    Error,
    Hello,
    Ping,
    Pong,
    ServerAck,
    ServerMessage,
    Welcome,
    decode_server,
    encode,
    encode_body,
)
from securemsg.errors import ConfigError, SecureMsgError, TLSError
from securemsg.tls.certinfo import CertInfo, cert_info_from_der, read_cert_info
from securemsg.tls.contexts import ALPN_PROTOCOL, client_context, translate_client_error

__all__ = ["Step", "check_files", "diagnose"]

_NOT_TLS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)
_CLOCK_WARNING: Final = 1.0  # seconds of offset worth mentioning
_EXPIRY_WARNING_DAYS: Final = 30


@dataclass
class Step:
    """One check: what was looked at, whether it passed, what it found, and the fix."""

    step: str
    ok: bool
    detail: str
    fix: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != {}}


class _Failed(Exception):
    def __init__(self, step: Step) -> None:
        self.step = step


def _fail(step: str, detail: str, fix: str, **facts: Any) -> _Failed:
    return _Failed(Step(step, False, detail, fix, facts))


# -- local files ------------------------------------------------------------------------------


def check_files(config: ClientConfig) -> list[Step]:
    """The local configuration: CA, certificate and key, name and token."""
    return _until_failed(_file_steps(config))


def _until_failed(steps: Iterator[Step]) -> list[Step]:
    """The steps taken, the failed one last (a step that fails raises _Failed)."""
    taken: list[Step] = []
    try:
        for step in steps:
            taken.append(step)
    except _Failed as failed:
        taken.append(failed.step)
    return taken


def _file_steps(config: ClientConfig) -> Iterator[Step]:
    where = ",".join(str(address) for address in config.addresses())
    yield Step("config", True, f"would connect to {where}")
    if config.ca is None:
        yield Step("ca", True, "no --ca: the server must have a certificate from a public CA")
    else:
        info = _read(config.ca, "--ca", step="ca")
        yield _validity_step("ca", f"CA file {config.ca}", info)
    try:
        client_context(ca=config.ca, cert=config.cert, key=config.key)
    except ConfigError as exc:
        raise _fail("client_certificate", str(exc), "fix or replace the file named") from None
    if config.cert is None:
        yield Step("client_certificate", True, "none (fine unless the server requires one)")
    else:
        info = _read(config.cert, "--cert", step="client_certificate")
        yield _validity_step("client_certificate", f"certificate {config.cert}", info)
    if config.name is None and config.cert is None:
        raise _fail(
            "name",
            "no name to register as, and no client certificate to name us",
            "pass --name NAME (or set SECUREMSG_NAME), or use a client certificate",
        )
    yield Step("name", True, config.name or "taken from the client certificate")
    yield Step("token", True, "set (not shown)" if read_token(config) else "none")


def _read(path: str, option: str, *, step: str) -> CertInfo:
    try:
        return read_cert_info(path, option=option)
    except ConfigError as exc:
        raise _fail(step, str(exc), f"check the file given with {option}") from None


def _validity_step(step: str, what: str, info: CertInfo) -> Step:
    days = info.days_left()
    facts = {"subject": info.subject, "issuer": info.issuer, "days_left": days}
    if not info.valid_at():
        raise _fail(
            step,
            f"{what} is not valid now (expires {info.not_after:%Y-%m-%d})",
            "renew it",
            **facts,
        )
    note = f"; expires in {days:.0f} days" if days <= _EXPIRY_WARNING_DAYS else ""
    return Step(
        step, True, f"{what}: {info.subject}, valid for {days:.0f} more days{note}", facts=facts
    )


# -- one connection ---------------------------------------------------------------------------


def diagnose(config: ClientConfig) -> list[Step]:
    """Follow one connection to ``config.host:config.port``; stops at the first failure."""
    return _until_failed(_connection_steps(config))


def _connection_steps(config: ClientConfig) -> Iterator[Step]:
    host, port, timeout = config.host, config.port, config.connect_timeout
    where = f"{host}:{port}"
    try:
        context = client_context(ca=config.ca, cert=config.cert, key=config.key)
    except ConfigError as exc:
        raise _fail(
            "files", str(exc), "fix the file named, or run doctor without an address"
        ) from None
    yield Step("files", True, "CA, certificate and key files load")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _fail(
            "resolve",
            f"cannot resolve {host!r}: {exc.strerror}",
            "check the host name, or use an IP address",
        ) from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    yield Step("resolve", True, f"{host} is {', '.join(addresses)}", facts={"addresses": addresses})
    started = time.monotonic()
    sock = _tcp([info[4][:2] for info in infos], where, timeout)
    address = sock.getpeername()[:2]
    with sock:
        took = time.monotonic() - started
        yield Step("tcp", True, f"connected to {address[0]} port {port} in {took * 1000:.1f} ms")
        yield from _probe_tls(sock, config, where)
    with _tcp([address], where, timeout) as sock:
        yield from _session(sock, context, config, where)


def _tcp(addresses: list[Any], where: str, timeout: float) -> socket.socket:
    """The first address that accepts, in the resolver's order (as a client tries them)."""
    for address in addresses[:-1]:
        try:
            return socket.create_connection(address, timeout=timeout)
        except OSError:
            continue
    try:
        return socket.create_connection(addresses[-1], timeout=timeout)
    except ConnectionRefusedError:
        raise _fail(
            "tcp",
            f"nothing listens on {where} (connection refused)",
            "start the server, or check the host and port (default 7443)",
        ) from None
    except TimeoutError:
        raise _fail(
            "tcp",
            f"no answer from {where} within {timeout} s",
            "check that the address is reachable and no firewall drops it",
        ) from None
    except OSError as exc:
        raise _fail(
            "tcp",
            f"cannot connect to {where}: {exc.strerror or exc}",
            "check the address and the network",
        ) from None


def _probe_tls(sock: socket.socket, config: ClientConfig, where: str) -> Iterator[Step]:
    """Look at TLS without verifying anything, so a bad certificate can still be described."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    probe.minimum_version = ssl.TLSVersion.TLSv1_2
    probe.set_alpn_protocols([ALPN_PROTOCOL])
    if config.cert is not None:  # loaded already by the files step; a TLS 1.2 server asks
        probe.load_cert_chain(config.cert, config.key)
    timeout = config.connect_timeout
    try:
        tls = probe.wrap_socket(sock, server_hostname=config.host)
    except (ssl.SSLEOFError, ConnectionError):
        raise _fail(
            "tls",
            f"{where} closed the connection instead of answering in TLS",
            "use the server's TLS port; a securemsg server refuses other protocols",
        ) from None
    except ssl.SSLError as exc:
        if exc.reason in _NOT_TLS:
            raise _fail(
                "tls",
                f"{where} did not answer in TLS: it looks like a plaintext port",
                "use the server's TLS port (securemsg serves TLS only)",
            ) from None
        raise _fail(
            "tls",
            f"TLS with {where} failed: {exc.reason or exc}",
            "check that this is a securemsg server and that it accepts TLS 1.2 or 1.3",
        ) from None
    except TimeoutError:
        raise _fail(
            "tls",
            f"{where} did not answer the TLS hello within {timeout} s",
            "use the server's TLS port; a plaintext service may wait for us to speak",
        ) from None
    except OSError:
        raise _fail(
            "tls",
            f"{where} closed the connection instead of answering in TLS",
            "use the server's TLS port; a securemsg server refuses other protocols",
        ) from None
    with tls:
        cipher = tls.cipher()
        version = tls.version()
        yield Step(
            "tls",
            True,
            f"{version}, cipher {cipher[0] if cipher else '?'}",
            facts={"version": version, "cipher": cipher[0] if cipher else None},
        )
        alpn = tls.selected_alpn_protocol()
        if alpn != ALPN_PROTOCOL:
            raise _fail(
                "alpn",
                f"{where} did not agree to {ALPN_PROTOCOL} (ALPN: {alpn})",
                "this is not a securemsg server; check the port",
            )
        yield Step("alpn", True, ALPN_PROTOCOL)
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise _fail(
            "certificate", "the server sent no certificate", "configure the server's --cert"
        )
    info = cert_info_from_der(der)
    facts = {
        "subject": info.subject,
        "names": list(info.names),
        "issuer": info.issuer,
        "days_left": info.days_left(),
    }
    text = (
        f"{info.subject} for {', '.join(info.names) or 'no names'}, issued by "
        f"{info.issuer}, {info.days_left():.0f} days left"
    )
    if not info.valid_at():
        raise _fail(
            "certificate",
            f"the server certificate is not valid now: {text}",
            "renew the server's certificate and send it SIGHUP",
            **facts,
        )
    yield Step("certificate", True, text, facts=facts)


def _session(
    sock: socket.socket, context: ssl.SSLContext, config: ClientConfig, where: str
) -> Iterator[Step]:
    host, mutual = config.host, config.cert is not None
    try:
        tls = context.wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as exc:
        raise _tls_failure(exc, config) from None
    with tls:
        yield Step(
            "verify",
            True,
            f"the certificate chains to {config.ca or 'the system CAs'} and is valid for {host!r}",
        )
        talk = _Talk(tls)
        name = config.name or (None if mutual else f"doctor-{secrets.token_hex(3)}")
        talk.send(Hello(version=PROTOCOL_VERSION, name=name, token=read_token(config)))
        try:
            first = talk.receive()
        except (ssl.SSLError, OSError, EOFError) as exc:
            raise _refused_after_tls(exc, config) from None
        yield Step("client_certificate", True, "accepted" if mutual else "not required")
        welcome = _welcome(first)
        yield Step(
            "welcome",
            True,
            f"protocol {welcome.version} as {welcome.name!r}; heartbeat"
            f" every {welcome.heartbeat.interval} s, max frame {welcome.max_frame} bytes",
            facts={
                "version": welcome.version,
                "name": welcome.name,
                "heartbeat_interval": welcome.heartbeat.interval,
                "heartbeat_timeout": welcome.heartbeat.timeout,
                "max_frame": welcome.max_frame,
            },
        )
        yield from _round_trip(talk, welcome.name)


def _tls_failure(exc: BaseException, config: ClientConfig) -> _Failed:
    error: TLSError = translate_client_error(
        exc, host=config.host, ca=config.ca, mutual=config.cert is not None
    )
    step = {"unknown_authority": "verify", "hostname_mismatch": "verify", "expired": "verify"}
    name = step.get(error.check, "client_certificate" if error.check else "tls")
    detail, _, fix = str(error).partition("; ")
    return _fail(name, detail, fix or "see the server's log (tls_handshake_failed)")


def _refused_after_tls(exc: BaseException, config: ClientConfig) -> _Failed:
    """In TLS 1.3 the server judges our certificate after our side of the handshake is done:
    its refusal arrives as an alert, or (asyncio servers, gh-98078) as a bare close."""
    if isinstance(exc, TimeoutError):
        return _fail(
            "welcome",
            "the server did not answer our hello in time",
            "see the server's log; is it overloaded?",
        )
    if config.cert is None:
        return _fail(
            "client_certificate",
            "the server closed the connection after TLS: it requires a client certificate",
            "pass --cert and --key with a certificate from a CA the server trusts",
        )
    return _fail(
        "client_certificate",
        f"the server rejected our client certificate {config.cert}",
        "use a certificate issued by a CA the server trusts (--ca on the server)"
        " that has not expired",
    )


def _welcome(first: ServerMessage) -> Welcome:
    if isinstance(first, Welcome):
        return first
    if isinstance(first, Error):
        fixes = {
            "unauthorized": "set SECUREMSG_TOKEN to the server's token, or use an allowed"
            " client certificate",
            "name_taken": "another client holds this name: pass another --name",
            "unsupported_version": "use a securemsg version that speaks the server's protocol",
        }
        raise _fail(
            "welcome",
            f"the server refused our hello: {first.code} ({first.message})",
            fixes.get(first.code, "see the server's log"),
        )
    raise _fail(
        "welcome",
        f"the server answered hello with {type(first).__name__}",
        "this does not look like a securemsg server",
    )


def _round_trip(talk: _Talk, name: str) -> Iterator[Step]:
    sent = time.time()
    talk.send(Direct(to=name, body=encode_body("doctor"), id="doctor-1"))
    delivery: Delivery | None = None
    acked = False
    while delivery is None or not acked:
        frame = talk.receive()
        if isinstance(frame, Delivery):
            delivery = frame
        elif isinstance(frame, ServerAck):
            acked = acked or "doctor-1" in frame.ids
        elif isinstance(frame, Error):
            raise _fail(
                "round_trip",
                f"the server refused a message to ourselves: {frame.code}",
                "see the server's log",
            )
    received = time.time()
    rtt = received - sent
    yield Step(
        "round_trip",
        True,
        f"a message to ourselves came back in {rtt * 1000:.1f} ms",
        facts={"rtt": round(rtt, 6)},
    )
    offset = delivery.ts - (sent + received) / 2
    ahead = "ahead of" if offset > 0 else "behind"
    note = " (large: check NTP on both machines)" if abs(offset) > _CLOCK_WARNING else ""
    yield Step(
        "clock",
        True,
        f"the server's clock is {abs(offset) * 1000:.1f} ms {ahead} ours"
        f" (within {rtt * 500:.1f} ms){note}",
        facts={"offset": round(offset, 6)},
    )
    talk.send(Ack(seq=delivery.seq))
    talk.send(Bye(reason="client_bye"))


class _Talk:
    """Frames over a blocking TLS socket (its timeout bounds every read)."""

    def __init__(self, tls: ssl.SSLSocket) -> None:
        self.tls = tls
        self.decoder = FrameDecoder(16 * 1024 * 1024)
        self.frames: list[ServerMessage] = []

    def send(self, message: Any) -> None:
        self.tls.sendall(encode_frame(encode(message)))

    def receive(self) -> ServerMessage:
        while True:
            while not self.frames:
                data = self.tls.recv(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.frames.extend(decode_server(f) for f in self.decoder.feed(data))
            frame = self.frames.pop(0)
            if isinstance(frame, Ping):
                self.send(Pong(id=frame.id))
                continue
            return frame


def failure_sentence(steps: list[Step]) -> str | None:
    """The first failure as one sentence with its fix, or None when every step passed."""
    for step in steps:
        if not step.ok:
            return f"{step.detail}; {step.fix}" if step.fix else step.detail
    return None


def raise_on_failure(steps: list[Step]) -> None:
    sentence = failure_sentence(steps)
    if sentence is not None:
        raise SecureMsgError(f"doctor: {sentence}")
