"""``send --datagram`` and ``listen --datagram``: the commands over the datagram channel
(:mod:`securemsg.client.datagram`), to the client's ``host`` and ``port`` over UDP.

``send --datagram`` returns 0 once the datagram left: nothing acknowledges a datagram
publish. ``listen --datagram`` prints what arrives as ``listen`` does; with ``--json`` each
object carries ``"datagram": true``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from securemsg.cli.client_common import check_room, parse_body, with_default_name
from securemsg.cli.commands import _emit, _render, _StdoutClosedError
from securemsg.client.datagram import DatagramClient, connect
from securemsg.config import ClientConfig, read_token
from securemsg.errors import ConfigError, SecureMsgError

__all__ = ["run_listen", "run_send"]


async def _connect(config: ClientConfig) -> DatagramClient:
    config = with_default_name(config)
    return await connect(
        config.host,
        config.port,
        ca=config.ca,
        name=config.name,
        cert=config.cert,
        key=config.key,
        token=read_token(config),
        timeout=config.connect_timeout,
    )


async def run_send(config: ClientConfig, *, room: str | None, to: str | None, message: str) -> int:
    if to is not None or room is None:
        raise ConfigError("--datagram sends to a --room only (directs need the TLS channel)")
    check_room(room)
    body = parse_body(message)
    client = await _connect(config)
    try:
        await client.publish(room, body)
    except ValueError as exc:
        raise SecureMsgError(f"not sent: the {exc}") from None
    finally:
        await client.close()
    return 0


async def run_listen(
    config: ClientConfig, *, rooms: Sequence[str], count: int | None, json_output: bool
) -> int:
    for room in rooms:
        check_room(room, pattern=True)
    if count is not None and count < 1:
        raise ConfigError(f"--count {count}: the count must be at least 1")
    client = await _connect(config)
    try:
        for room in dict.fromkeys(rooms):
            await client.join(room, timeout=config.connect_timeout)
        printed = 0
        with contextlib.suppress(_StdoutClosedError):
            async for message in client:
                _emit(_render(message, json_output=json_output))
                printed += 1
                if count is not None and printed >= count:
                    break
    finally:
        await client.close()
    return 0
