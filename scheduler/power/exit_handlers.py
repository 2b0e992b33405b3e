"""Restores a plain process's device settings when it exits or receives SIGTERM/SIGHUP."""

from __future__ import annotations

import atexit
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

from scheduler.power.actuator import PowerActuator

log = logging.getLogger(__name__)


def install_exit_handlers(
    actuator: PowerActuator, signals: Iterable[int] = (signal.SIGTERM, signal.SIGHUP)
) -> Callable[[], None]:
    """For a plain process: restore at interpreter exit and on SIGTERM/SIGHUP. Returns an uninstaller.

    The node agent calls restore_all() itself on shutdown; this is for CLIs and scripts. Must be
    called from the main thread (Python only delivers signals there).
    """
    done = threading.Event()

    def restore_once(reason: str) -> None:
        if done.is_set():
            return
        done.set()
        try:
            actuator.restore_all(reason=reason)
        except Exception:
            log.exception("restoring device settings failed")

    atexit_cb = lambda: restore_once("restore at process exit")  # noqa: E731
    atexit.register(atexit_cb)
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        restore_once(f"restore on {signal.Signals(signum).name}")
        prev = previous.get(signum)
        if callable(prev):
            prev(signum, frame)
        raise SystemExit(128 + signum)

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)

    def uninstall() -> None:
        atexit.unregister(atexit_cb)
        for sig, prev in previous.items():
            signal.signal(sig, prev)

    return uninstall
