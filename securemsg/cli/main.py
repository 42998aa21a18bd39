"""The ``securemsg`` command: argument parsing and process concerns only.

Every failure a user can cause ends in one sentence on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from securemsg import __version__
from securemsg.config import (
    ClientConfig,
    ServerConfig,
    add_config_flags,
    load_config,
    overrides_from_args,
)
from securemsg.core.address import parse_addresses
from securemsg.errors import ConfigError, SecureMsgError
from securemsg.log import configure_logging
from securemsg.runner import run

__all__ = ["main"]

DEFAULT_PORT = 7443
EXIT_USAGE = 2
#: Client options given by the address argument, not by flags of their own.
_ADDRESS_FIELDS = ("host", "port", "servers")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.handler(args))
    except SecureMsgError as exc:
        print(f"securemsg: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    _check_flags(parser, words)
    args, extra = parser.parse_known_args(words)
    if extra and not any(word.startswith("-") for word in extra):
        if getattr(args, "client_command", None) == "send":
            # `send HOST:PORT --room R MESSAGE`: argparse takes HOST:PORT as the whole word
            # list and leaves MESSAGE over, because options stand between them.
            args.words += extra
            extra = []
        elif args.command == "bench" and len(extra) == 1 and args.address is None:
            # `bench pubsub --msgs 10 HOST`: the optional positional was passed over.
            if args.local:
                _subparser(parser, "bench").error("HOST[:PORT] and --local exclude each other")
            args.address = extra.pop()
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise LookupError(name)


def _check_flags(parser: argparse.ArgumentParser, words: list[str]) -> None:
    """An option the command does not have ends with that command's usage and the closest
    option it does have (argparse would show the top-level usage, or first complain about
    a missing --room)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    start = next((i for i, word in enumerate(words) if word in commands.choices), None)
    if start is None:
        return
    sub: argparse.ArgumentParser = commands.choices[words[start]]
    known = list(sub._option_string_actions)
    for word in words[start + 1 :]:
        if word == "--":
            return
        if not word.startswith("-") or word == "-" or _is_number(word):
            continue
        flag = word.split("=", 1)[0]
        if flag in known or (flag.startswith("--") and _prefix_of_one(flag, known)):
            continue
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        sub.error(f"unrecognized option {flag}{hint}")


def _prefix_of_one(flag: str, known: list[str]) -> bool:
    """argparse takes an unambiguous abbreviation of a long option."""
    return len([option for option in known if option.startswith(flag)]) == 1


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="securemsg", description="TLS-only messaging: server, clients and dev certificates."
    )
    parser.add_argument("--version", action="version", version=f"securemsg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certs = commands.add_parser("certs", help="make development certificates with trustme")
    certs.add_argument("--dir", default="certs", help="where to write them (default: certs)")
    certs.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="a server host name or address (repeatable; default: localhost, 127.0.0.1, ::1)",
    )
    certs.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="also make a client certificate for NAME (repeatable)",
    )
    certs.add_argument("--force", action="store_true", help="start over with a new CA")
    certs.set_defaults(handler=_cmd_certs)

    server = commands.add_parser("server", help="run the server")
    server.add_argument("--config", metavar="FILE", help="a TOML file with a [server] table")
    server.add_argument(
        "--dev",
        action="store_true",
        help="use development certificates from certs/, making them if missing",
    )
    add_config_flags(server, ServerConfig)
    server.set_defaults(handler=_cmd_server)

    for name, help_text in (
        ("client", "chat interactively (or publish stdin lines when not a terminal)"),
        ("send", "send one message and wait for the acknowledgement"),
        ("listen", "print messages from a room"),
    ):
        sub = commands.add_parser(name, help=help_text)
        if name != "send":  # send takes [HOST[:PORT]] MESSAGE as one list: see _cmd_client
            sub.add_argument(
                "address",
                nargs="?",
                metavar="HOST[:PORT]",
                help="the server (default: localhost:7443); the nodes of a cluster separated "
                "by commas (HOST1:PORT,HOST2:PORT)",
            )
        sub.add_argument("--config", metavar="FILE", help="a TOML file with a [client] table")
        add_config_flags(sub, ClientConfig, exclude=_ADDRESS_FIELDS)
        if name == "client":
            sub.add_argument(
                "--room",
                action="append",
                default=[],
                metavar="ROOM",
                help="join ROOM (repeatable; the first is the current room)",
            )
            sub.add_argument("--json", action="store_true", help="print one JSON object a line")
        elif name == "send":
            target = sub.add_mutually_exclusive_group(required=True)
            target.add_argument("--room", metavar="ROOM", help="publish to ROOM")
            target.add_argument("--to", metavar="NAME", help="send directly to NAME")
            # argparse cannot put an optional positional before a required one when options
            # stand between them, so both are taken as one list of one or two words.
            sub.formatter_class = _SendHelpFormatter
            sub.add_argument(
                "words",
                nargs="+",
                metavar="[HOST[:PORT]] MESSAGE",
                help="the server (default: localhost:7443; several separated by commas), "
                "then the body: JSON if it parses as JSON, else a string",
            )
            sub.add_argument(
                "--datagram",
                action="store_true",
                help="send over DTLS (UDP) to the same port: at most once, no acknowledgement",
            )
        else:
            sub.add_argument(
                "--room",
                action="append",
                required=True,
                metavar="ROOM",
                help="listen to ROOM (repeatable; wildcards allowed)",
            )
            sub.add_argument("--count", type=int, metavar="N", help="exit after N messages")
            sub.add_argument("--json", action="store_true", help="print one JSON object a line")
            sub.add_argument(
                "--datagram",
                action="store_true",
                help="listen over DTLS (UDP) to the same port: datagram publishes only",
            )
        sub.set_defaults(handler=_cmd_client, client_command=name)
    doctor = commands.add_parser(
        "doctor",
        help="diagnose a connection to a server step by step (or, without one, the local files)",
        description="Follow one connection from the host name to a message and stop at the"
        " first failure with its fix. Without an address, check the local configuration and"
        " certificate files. Exit status 0 only when a client could work.",
    )
    doctor.add_argument(
        "address",
        nargs="?",
        metavar="HOST[:PORT]",
        help="the server (default: only local checks); several separated by commas: each "
        "one is diagnosed",
    )
    doctor.add_argument("--config", metavar="FILE", help="a TOML file with a [client] table")
    add_config_flags(doctor, ClientConfig, exclude=_ADDRESS_FIELDS)
    doctor.add_argument("--json", action="store_true", help="print the steps as one JSON object")
    doctor.set_defaults(handler=_cmd_doctor)
    _add_bench_parser(commands)
    return parser


class _SendHelpFormatter(argparse.HelpFormatter):
    """``send`` takes one or two words; argparse would show ``A [A ...]`` for them."""

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.dest == "words":
            return "[HOST[:PORT]] MESSAGE"
        return super()._format_args(action, default_metavar)


# -- certs ------------------------------------------------------------------------------------


def _cmd_certs(args: argparse.Namespace) -> int:
    from securemsg.tls.devcerts import DEFAULT_HOSTS, dev_pki_banner, make_dev_pki

    pki = make_dev_pki(
        args.dir, hosts=args.host or DEFAULT_HOSTS, clients=args.client, force=args.force
    )
    for path in pki.created:
        print(f"wrote {path}")
    if not pki.created:
        print(f"nothing to do: {pki.directory} already has every file asked for")
    print(dev_pki_banner(pki))
    return 0


# -- server -----------------------------------------------------------------------------------


def _cmd_server(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args, ServerConfig)
    if args.dev:
        from securemsg.tls.devcerts import dev_pki_banner, ensure_dev_pki

        pki = ensure_dev_pki("certs")
        if pki.created:
            print(dev_pki_banner(pki), file=sys.stderr)
        overrides.setdefault("cert", str(pki.server_cert))
        overrides.setdefault("key", str(pki.server_key))

    def read_config() -> ServerConfig:
        return load_config(ServerConfig, path=args.config, env=os.environ, overrides=overrides)

    config = read_config()
    if config.cert is None:
        where = f"set cert and key in the [server] table of {args.config}, " if args.config else ""
        raise ConfigError(
            f"the server needs a certificate: pass --cert and --key, {where}or use --dev "
            "for development certificates made in certs/"
        )
    configure_logging(level=config.log_level, fmt=config.log_format)
    return run(_serve(config, reload_config=read_config))


async def _serve(config: ServerConfig, *, reload_config: Callable[[], ServerConfig]) -> int:
    from securemsg.server.server import Server

    server = Server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP reloads the certificate, key and CA (the configuration is read again for them).
    loop.add_signal_handler(signal.SIGHUP, server.reload_tls, reload_config)
    async with server:
        await stop.wait()
    return 0


# -- client, send, listen ---------------------------------------------------------------------


def _cmd_client(args: argparse.Namespace) -> int:
    if args.client_command == "send":
        if len(args.words) > 2:
            raise SecureMsgError(
                "send takes [HOST[:PORT]] and one MESSAGE; quote a message that has spaces"
            )
        args.address = args.words[0] if len(args.words) == 2 else None
        args.message = args.words[-1]
    overrides: dict[str, Any] = overrides_from_args(args, ClientConfig)
    if args.address:
        overrides.update(_parse_address(args.address))
    config = load_config(ClientConfig, path=args.config, env=os.environ, overrides=overrides)
    configure_logging(level=config.log_level, fmt=config.log_format)
    if getattr(args, "datagram", False):
        from securemsg.cli import datagram

        if args.client_command == "send":
            return run(datagram.run_send(config, room=args.room, to=args.to, message=args.message))
        return run(
            datagram.run_listen(config, rooms=args.room, count=args.count, json_output=args.json)
        )
    from securemsg.cli import commands as chat

    if args.client_command == "send":
        return run(chat.run_send(config, room=args.room, to=args.to, message=args.message))
    if args.client_command == "listen":
        return run(
            chat.run_listen(config, rooms=args.room, count=args.count, json_output=args.json)
        )
    return chat.run_client(config, rooms=args.room, json_output=args.json)


# -- doctor -----------------------------------------------------------------------------------


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    import msgspec

    from securemsg.cli import doctor

    overrides: dict[str, Any] = overrides_from_args(args, ClientConfig)
    if args.address:
        overrides.update(_parse_address(args.address))
    config = load_config(ClientConfig, path=args.config, env=os.environ, overrides=overrides)
    configure_logging(level=config.log_level, fmt=config.log_format)
    if not args.address:
        targets: list[tuple[str | None, ClientConfig]] = [(None, config)]
    else:
        # Each server of a cluster on its own: a broken node is worth knowing about.
        targets = [
            (str(a), msgspec.structs.replace(config, host=a.host, port=a.port, servers=None))
            for a in config.addresses()
        ]
    reports, failures = [], []
    for target, one in targets:
        steps = doctor.diagnose(one) if target else doctor.check_files(one)
        sentence = doctor.failure_sentence(steps)
        if sentence is not None:
            failures.append(sentence if len(targets) == 1 else f"{target}: {sentence}")
        reports.append(
            {"target": target, "ok": sentence is None, "steps": [s.as_dict() for s in steps]}
        )
        if not args.json:
            print(f"securemsg doctor: {target or 'local configuration'}")
            for step in steps:
                print(f"  {'ok' if step.ok else 'FAIL':4}  {step.step:18}  {step.detail}")
    if args.json:
        whole = reports[0] if len(reports) == 1 else {"ok": not failures, "targets": reports}
        print(json.dumps(whole, indent=2))
    if failures:
        raise SecureMsgError(f"doctor: {'; '.join(failures)}")
    return 0


# -- bench ------------------------------------------------------------------------------------


def _add_bench_parser(commands: Any) -> None:
    from securemsg.bench import SCENARIOS

    bench = commands.add_parser(
        "bench",
        help="measure a server: throughput, latency, connections, handshakes",
        description="Drive a securemsg server with real clients and verify what arrives.",
    )
    bench.add_argument("scenario", choices=SCENARIOS, help="what to measure")
    where = bench.add_mutually_exclusive_group()
    where.add_argument(
        "address",
        nargs="?",
        metavar="HOST[:PORT]",
        help="the server (default: localhost:7443); the nodes of a cluster separated by "
        "commas: publishers on the first, subscribers on the second (--unpaced), or every "
        "client on the next in turn",
    )
    where.add_argument(
        "--local", action="store_true", help="start a local server (dev certificates, free port)"
    )
    bench.add_argument("--ca", metavar="FILE", help="CA bundle the server certificate chains to")
    bench.add_argument("--msgs", type=int, metavar="N", help="messages (or round trips) in all")
    bench.add_argument("--size", type=int, default=128, metavar="BYTES", help="body size")
    bench.add_argument(
        "--duration", type=float, metavar="S", help="bound on a run; hold time of connections"
    )
    bench.add_argument("--rate", type=float, default=0.0, metavar="N", help="msgs/s offered")
    bench.add_argument("--pub", type=int, default=1, metavar="N", help="publishers (pubsub)")
    bench.add_argument("--sub", type=int, default=1, metavar="N", help="subscribers (pubsub)")
    bench.add_argument(
        "--clients", type=int, metavar="N", help="subscribers, connections or handshakes"
    )
    bench.add_argument("--concurrency", type=int, default=8, metavar="N", help="handshakes at once")
    bench.add_argument(
        "--unpaced",
        action="store_true",
        help="pubsub/fanout: publishers and subscribers in their own processes, publishing "
        "as fast as the client allows (as nats bench measures)",
    )
    bench.add_argument("--server-pid", type=int, metavar="PID", help="local server to measure")
    bench.add_argument(
        "--server-loop", choices=("uvloop", "asyncio"), help="event loop of the --local server"
    )
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    lossy = bench.add_argument_group("datagram: the impaired link (a proxy on 127.0.0.1)")
    lossy.add_argument("--loss", type=float, default=0.0, metavar="F", help="fraction dropped")
    lossy.add_argument(
        "--reorder", type=float, default=0.0, metavar="F", help="fraction delivered late"
    )
    lossy.add_argument(
        "--delay", type=float, default=0.0, metavar="S", help="one-way delay, seconds"
    )
    lossy.add_argument(
        "--deadline", type=float, default=0.05, metavar="S", help="'on time' bound, seconds"
    )
    bench.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import msgspec

    if args.scenario == "datagram":
        from securemsg.bench.datagram import bench_datagram_main

        configure_logging(level="error", fmt="auto")
        address = _parse_address(args.address) if args.address else {}
        return run(
            bench_datagram_main(
                host=address.get("host", "localhost"),
                port=address.get("port", DEFAULT_PORT),
                ca=args.ca,
                local=args.local,
                msgs=args.msgs or 2000,
                rate=args.rate or 200.0,
                size=args.size,
                loss=args.loss,
                reorder=args.reorder,
                delay=args.delay,
                deadline=args.deadline,
                json_output=args.json,
            )
        )

    from securemsg.bench.run import BenchOptions, BenchResult, bench_main, format_result

    configure_logging(level="error", fmt="auto")
    address = _parse_address(args.address) if args.address else {}
    servers: tuple[str, ...] = ()
    if "servers" in address:
        found = parse_addresses(address.pop("servers"), default_port=DEFAULT_PORT)
        servers = tuple(str(a) for a in found)
        address = {"host": found[0].host, "port": found[0].port}
    options = BenchOptions(
        servers=servers,
        scenario=args.scenario,
        host=address.get("host", "localhost"),
        port=address.get("port", DEFAULT_PORT),
        ca=args.ca,
        msgs=args.msgs,
        size=args.size,
        duration=args.duration,
        rate=args.rate,
        pub=args.pub,
        sub=args.sub,
        clients=args.clients,
        concurrency=args.concurrency,
        server_pid=args.server_pid,
        unpaced=args.unpaced,
    )

    def emit(result: BenchResult) -> None:
        if args.json:
            print(msgspec.json.encode(result).decode())
        else:
            print(format_result(result))

    return run(
        bench_main(
            options,
            local=args.local,
            server_loop=args.server_loop,
            show_progress=sys.stderr.isatty(),
            emit=emit,
        )
    )


def _parse_address(address: str) -> dict[str, Any]:
    """The config overrides an address argument gives: host and port, or ``servers`` for
    several separated by commas (their port default is the config's ``port``)."""
    if "," in address:
        try:
            parse_addresses(address, default_port=DEFAULT_PORT)
        except ValueError as exc:
            raise SecureMsgError(f"{address!r}: {exc}") from None
        return {"servers": address}
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        return {"host": address.strip("[]")}
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise SecureMsgError(f"{address!r}: the port must be a number from 1 to 65535")
    return {"host": host.strip("[]") or "localhost", "port": int(port)}
