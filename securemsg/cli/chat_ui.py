"""The interactive chat of ``securemsg client`` on a terminal, with prompt_toolkit.

One asyncio program: :class:`ChatUI` reads lines with ``PromptSession.prompt_async`` while
three tasks print what the client reports (messages, presence, connection state). Inside
``patch_stdout`` everything printed appears above the input line without disturbing what is
being typed, and the client's log lines are routed through the same proxy.

A line that is not a command is published to the current room: the first plain ``--room``,
then the last ``/join``. Commands: ``/join ROOM``, ``/leave [ROOM]``, ``/msg NAME text``,
``/who [ROOM]``, ``/help`` and ``/quit`` (also Ctrl-D and Ctrl-C). ``//text`` publishes
``/text``. Mistakes in a command print one line and the chat goes on; if the client gives up
reconnecting, the chat ends with that reason (exit 1).

The log level is raised from the default ``warning`` to ``error`` here, because the chat
itself shows the connection events those warnings report; pass ``--log-level`` to change it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Final

from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from securemsg.cli.client_common import check_room, format_message, open_client
from securemsg.client.client import (
    Client,
    Closed,
    Disconnected,
    Presence,
    Reconnected,
    Reconnecting,
    StateChange,
)
from securemsg.client.types import MessageSkipped
from securemsg.config import ClientConfig
from securemsg.core.messages import ErrorCode, is_valid_name, is_valid_room
from securemsg.errors import ClosedError, RejectedError, SecureMsgError
from securemsg.log import configure_logging
from securemsg.runner import run

__all__ = ["ChatUI", "describe_state_change", "run_interactive"]

HELP: Final = """\
commands:
  /join ROOM        join ROOM and make it the current room
  /leave [ROOM]     leave ROOM (default: the current room)
  /msg NAME text    send text to NAME only
  /who [ROOM]       who is in ROOM (default: the current room)
  /quit             leave the chat (also Ctrl-D)
  //text            publish "/text"
anything else is published to the current room"""

#: Log levels the chat raises, since it shows those events itself.
_QUIETER: Final = {"warning": "error"}

Command = Callable[[str], Awaitable[bool]]


def run_interactive(config: ClientConfig, *, rooms: Sequence[str]) -> int:
    """Run the chat until ``/quit`` (0); raise :class:`SecureMsgError` if the client gives up."""
    return run(_chat(config, rooms))


async def _chat(config: ClientConfig, rooms: Sequence[str]) -> int:
    level = _QUIETER.get(config.log_level, config.log_level)
    with patch_stdout(raw=True):
        configure_logging(level=level, fmt=config.log_format)  # to the proxy on sys.stderr
        try:
            where = ",".join(str(address) for address in config.addresses())
            print(f"connecting to {where} ...", flush=True)
            async with open_client(config) as client:
                return await ChatUI(client).run(rooms)
        finally:
            configure_logging(level=level, fmt=config.log_format)  # the real stderr again


def describe_state_change(change: StateChange, *, lost: str | None) -> str:
    """One line for ``change``; ``lost`` is the reason of the disconnect it follows, if any."""
    if isinstance(change, Disconnected):
        return f"connection lost ({change.reason})"
    if isinstance(change, Reconnecting):
        if lost is not None:
            return f"connection lost ({lost}), retrying in {change.delay:.1f} s"
        return f"still disconnected, retrying in {change.delay:.1f} s (attempt {change.attempt})"
    if isinstance(change, Reconnected):
        if change.resumed:
            return "reconnected (resumed)"
        if change.gap is None:
            return "reconnected: session expired, messages may be missing"
        return f"reconnected: session expired, {change.gap} messages may be missing"
    if isinstance(change, MessageSkipped):
        return f"message {change.seq} skipped: its body cannot be read here ({change.reason})"
    return "connection closed" + (f": {change.error}" if change.error else "")


class ChatUI:
    """The chat over one connected :class:`Client`."""

    def __init__(self, client: Client) -> None:
        self.client = client
        #: Rooms (and room filters) joined, in the order they were joined.
        self.rooms: list[str] = []
        #: Where plain lines go; None until a plain room is joined.
        self.current: str | None = None
        self._commands: dict[str, Command] = {
            "join": self._join,
            "leave": self._leave,
            "msg": self._msg,
            "who": self._who,
            "help": self._help,
            "quit": self._quit,
            "exit": self._quit,
        }

    @property
    def _timeout(self) -> float:
        return self.client.config.connect_timeout

    def show(self, text: str) -> None:
        print(text, flush=True)

    async def run(self, rooms: Sequence[str]) -> int:
        """Join ``rooms``, then chat until ``/quit`` (0) or until the client gives up."""
        # Subscribe first, so nothing that happens from now on is missed.
        changes, presence = self.client.state_changes(), self.client.presence()
        for room in dict.fromkeys(rooms):
            await self.client.join(room, timeout=self._timeout)
            self._joined(room)
        self.current = next((room for room in rooms if is_valid_room(room)), None)
        where = f"; in {', '.join(self.rooms)}" if self.rooms else "; /join ROOM to start"
        self.show(f"connected as {self.client.name}{where} (/help for commands)")
        states = asyncio.create_task(self._show_states(changes))
        tasks = [
            asyncio.create_task(self._show_messages()),
            asyncio.create_task(self._show_presence(presence)),
        ]
        commands = asyncio.create_task(self._read_commands())
        try:
            await asyncio.wait([commands, states], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (commands, states, *tasks):
                task.cancel()
            await asyncio.gather(commands, states, *tasks, return_exceptions=True)
        if commands.done() and not commands.cancelled():
            error = commands.exception()
            if error is None:
                return 0
            if not isinstance(error, ClosedError):
                raise error
        raise SecureMsgError(self.client.failure or "the connection to the server closed")

    # -- input ---------------------------------------------------------------------------------

    async def _read_commands(self) -> None:
        session: PromptSession[str] = PromptSession()
        while True:
            try:
                line = await session.prompt_async(self._prompt)
            except (EOFError, KeyboardInterrupt):
                return
            try:
                if not await self.handle(line.strip()):
                    return
            except (SecureMsgError, ValueError) as exc:
                if isinstance(exc, ClosedError):
                    raise
                self.show(f"error: {exc}")

    def _prompt(self) -> str:
        return f"{self.client.name}@{self.current}> " if self.current else f"{self.client.name}> "

    async def handle(self, line: str) -> bool:
        """Act on one input line; False means quit."""
        if not line:
            return True
        if line.startswith("/") and not line.startswith("//"):
            name, _, rest = line[1:].partition(" ")
            command = self._commands.get(name.lower())
            if command is None:
                self.show(f"unknown command /{name}; /help lists the commands")
                return True
            return await command(rest.strip())
        if self.current is None:
            self.show("you are in no room: /join ROOM first")
            return True
        await self.client.publish(self.current, line.removeprefix("/"))
        return True

    # -- commands ------------------------------------------------------------------------------

    async def _join(self, argument: str) -> bool:
        if not argument:
            self.show("usage: /join ROOM")
            return True
        room = check_room(argument, pattern=True, option="/join")
        await self.client.join(room, timeout=self._timeout)
        self._joined(room)
        if is_valid_room(room):
            self.current = room
            members = await self.client.who(room, timeout=self._timeout)
            self.show(f"joined {room}; here: {', '.join(members)}")
        else:
            self.show(f"joined {room}; messages of the rooms it matches will show up here")
        return True

    async def _leave(self, argument: str) -> bool:
        room = argument or self.current
        if room is None:
            self.show("usage: /leave ROOM")
            return True
        check_room(room, pattern=True, option="/leave")
        try:
            await self.client.leave(room, timeout=self._timeout)
        except RejectedError as exc:
            if exc.code != ErrorCode.NOT_MEMBER:
                raise
            self.show(f"you are not in {room}")
            return True
        with contextlib.suppress(ValueError):
            self.rooms.remove(room)
        if self.current == room:
            self.current = next((r for r in reversed(self.rooms) if is_valid_room(r)), None)
        now = f"; now in {self.current}" if self.current else ""
        self.show(f"left {room}{now}")
        return True

    async def _msg(self, argument: str) -> bool:
        name, _, text = argument.partition(" ")
        if not name or not text.strip():
            self.show("usage: /msg NAME text")
            return True
        if not is_valid_name(name):
            self.show(f"{name!r} is not a valid name")
            return True
        try:
            await self.client.direct(name, text.strip(), confirm=True, timeout=self._timeout)
        except RejectedError as exc:
            if exc.code != ErrorCode.NO_SUCH_USER:
                raise
            self.show(f"nobody called {name} is connected")
        return True

    async def _who(self, argument: str) -> bool:
        room = argument or self.current
        if room is None:
            self.show("usage: /who ROOM")
            return True
        check_room(room, pattern=True, option="/who")
        members = await self.client.who(room, timeout=self._timeout)
        self.show(f"in {room}: {', '.join(members) if members else 'nobody'}")
        return True

    async def _help(self, argument: str) -> bool:
        self.show(HELP)
        return True

    async def _quit(self, argument: str) -> bool:
        return False

    def _joined(self, room: str) -> None:
        if room not in self.rooms:
            self.rooms.append(room)

    # -- what the client reports ---------------------------------------------------------------

    async def _show_messages(self) -> None:
        with contextlib.suppress(ClosedError):
            async for message in self.client:
                self.show(format_message(message))

    async def _show_presence(self, events: AsyncIterator[Presence]) -> None:
        me = self.client.name
        async for event in events:
            if event.name != me:
                verb = "joined" if event.event == "join" else "left"
                self.show(f"{event.name} {verb} {event.room}")

    async def _show_states(self, changes: AsyncIterator[StateChange]) -> None:
        lost: str | None = None
        async for change in changes:
            if isinstance(change, Closed):
                return  # the chat ends with the reason (cli.main prints it)
            if isinstance(change, Disconnected):
                lost = change.reason  # shown with the retry delay that follows at once
                continue
            self.show(describe_state_change(change, lost=lost))
            lost = None
