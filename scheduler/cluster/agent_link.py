"""The request path's link from a replica to its node agent: the typed messages over a Unix socket.

A replica and its node agent are usually on the same machine, and a request's energy is on its
response path: the replica waits for the agent's answer to its RequestFinish before its end event
can go out. A Ray actor call carries that answer through several threads on each side (the core
worker's, then the actor's event loop, and back); each hand-over is a thread wake-up, and on a busy
machine each costs a scheduling delay. Over a Unix socket the message
goes from the replica's event loop to the agent's and back with one wake-up each way; vLLM links its
API server and engine core the same way (ZeroMQ over IPC). Everything else the agent does (power,
readings, simulated engines, the gateway's abandoned-request lookups) stays on Ray. A replica's stats
(ReplicaStats, several a second under load) take the link too when it is up: a Ray actor call costs
both processes far more CPU than a frame.

The link is used only where the replica runs on its agent's own Ray node (link_reaches): a replica
of an upstream model reports to the agent of the server's host, which is usually another machine.

Frames are a 4-byte big-endian length and a pickle of (call_id, message); call_id 0 means no answer
is wanted. The agent dispatches on the message's type (cluster.messages), never on a name. If the
socket cannot be reached or breaks, the replica falls back to the agent's Ray methods, which take
the same messages: a RequestFinish repeats its RequestStart, so a request is charged whichever way
its messages went.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import logging
import os
import pickle
import secrets
import struct
import tempfile
from collections.abc import Awaitable
from typing import Any

from scheduler.cluster.messages import AbandonRequest, ReplicaStats, RequestFinish, RequestProgress, RequestStart

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
#: a frame larger than this is not a message of ours: the connection is dropped
MAX_FRAME_BYTES = 1 << 20


def link_reaches(agent_ray_node_id: str | None, replica_ray_node_id: str | None) -> bool:
    """Whether a replica may use its node agent's Unix socket: only when both run on the same Ray node.

    A Unix socket connects only within one kernel. On another machine its path is absent or, where the
    temporary directory is a shared filesystem (TMPDIR on NFS), it is the other host's file, which
    exists here and refuses every connect; neither the path nor a host name (Wattlane node names
    come from hostnames or resources a user sets) proves one machine. A Ray node id names one raylet,
    on one machine, so equal ids do. Several Ray nodes on one machine (test clusters) have different
    ids and keep to Ray calls: slower there, never wrong.
    """
    return agent_ray_node_id is not None and agent_ray_node_id == replica_ray_node_id


def socket_path() -> str:
    """A fresh path for an agent to listen on: short, as Unix socket paths must be (108 bytes)."""
    return os.path.join(tempfile.gettempdir(), f"wattlane-agent-{os.getpid()}-{secrets.token_hex(4)}.sock")


def _remove_dead_sockets() -> None:
    """Delete the sockets of agents whose process is gone (one killed with SIGKILL leaves its file)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "wattlane-agent-*-*.sock")):
        pid = os.path.basename(path).split("-")[2]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        except (ValueError, PermissionError):
            pass  # not ours to judge


def _frame(call_id: int, message: Any) -> bytes:
    body = pickle.dumps((call_id, message), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, Any]:
    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME_BYTES:
        raise ConnectionError(f"frame of {size} bytes")
    return pickle.loads(await reader.readexactly(size))


class AgentLinkServer:
    """The agent's end: serves the request-path messages on its event loop."""

    def __init__(self, agent: Any, path: str):
        self.agent = agent
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._listening: asyncio.Future | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._listening = asyncio.get_running_loop().create_future()
        try:
            _remove_dead_sockets()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            old_umask = os.umask(0o177)  # only this user may connect: the messages are pickles
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=self.path)
            finally:
                os.umask(old_umask)
        except BaseException as exc:
            self._listening.set_exception(ConnectionError(f"agent link did not start: {exc!r}"))
            self._listening.exception()  # retrieved here: a caller that never waits must not log it
            raise
        self._listening.set_result(None)

    async def started(self) -> None:
        """Wait until start() listens (ConnectionError if it failed); start() must have been called."""
        await asyncio.shield(self._listening)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                call_id, message = await _read_frame(reader)
                self._dispatch(call_id, message, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the replica went away; what it sent was handled
        except asyncio.CancelledError:
            pass  # the loop is closing (a connection handler that raises it is logged as an error)
        except Exception:
            log.exception("agent link: bad message; dropping the connection")
        finally:
            writer.close()

    def _dispatch(self, call_id: int, message: Any, writer: asyncio.StreamWriter) -> None:
        agent = self.agent
        if isinstance(message, RequestStart):
            agent.start_request(message)
        elif isinstance(message, RequestProgress):
            agent.progress(message)
        elif isinstance(message, RequestFinish):
            try:
                value = agent.finish_at_once(message)
            except Exception as exc:  # the replica logs it and answers without energy
                log.exception("agent link: call %d failed", call_id)
                value = exc
            if value is NotImplemented:  # something must be waited for: a task answers when it is done
                self._spawn(self._answer(call_id, agent.finish_request(message), writer))
            else:
                self._write_answer(call_id, value, writer)
        elif isinstance(message, AbandonRequest):
            self._spawn(agent.abandon_request(message.finish, message.energy))
        elif isinstance(message, ReplicaStats):
            agent.replica_stats(message.replica_id, message.stats)
        else:
            raise TypeError(f"not a request-path message: {type(message).__name__}")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        # kept referenced until done; the replica going away does not stop a request's accounting
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, call_id: int, result: Awaitable[Any], writer: asyncio.StreamWriter) -> None:
        try:
            value = await result
        except Exception as exc:  # the replica logs it and answers without energy
            log.exception("agent link: call %d failed", call_id)
            value = exc
        self._write_answer(call_id, value, writer)

    @staticmethod
    def _write_answer(call_id: int, value: Any, writer: asyncio.StreamWriter) -> None:
        if call_id and not writer.is_closing():
            writer.write(_frame(call_id, value))


class AgentLink:
    """The replica's end: one connection, any number of requests in flight on it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reading = asyncio.get_running_loop().create_task(self._read_answers())

    @classmethod
    async def connect(cls, path: str) -> "AgentLink":
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    @property
    def alive(self) -> bool:
        return not self._reading.done() and not self._writer.is_closing()

    def usable_here(self) -> bool:
        """Alive, and the caller runs on the link's event loop (a stream writer is not thread-safe)."""
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return here is self._reading.get_loop() and self.alive

    def send(self, message: Any) -> None:
        """One-way (start, progress, abandon); raises ConnectionError if the link is down."""
        if not self.alive:
            raise ConnectionError("agent link is closed")
        self._writer.write(_frame(0, message))

    async def call(self, message: Any) -> Any:
        """Send and wait for the agent's answer; ConnectionError if the link breaks first."""
        if not self.alive:
            raise ConnectionError("agent link is closed")
        call_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._pending[call_id] = answer
        try:
            self._writer.write(_frame(call_id, message))
            value = await answer
        finally:
            self._pending.pop(call_id, None)
        if isinstance(value, Exception):
            raise value
        return value

    async def _read_answers(self) -> None:
        try:
            while True:
                call_id, value = await _read_frame(self._reader)
                answer = self._pending.get(call_id)
                if answer is not None and not answer.done():  # a cancelled caller no longer waits
                    answer.set_result(value)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            reason = exc
        except Exception as exc:  # an unreadable answer: nothing after it can be trusted
            log.exception("agent link: bad answer")
            reason = exc
        self._writer.close()
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ConnectionError(f"agent link closed: {reason!r}"))

    def close(self) -> None:
        self._writer.close()
        self._reading.cancel()

