"""Requests per minute, tokens per minute and concurrent requests, checked and counted inside one transaction.

The minute is sliding: an admission counts for 60 s from the moment it was made. A request counts
its prompt estimate + max_tokens toward tokens per minute while it runs (an upper bound, so two
replicas cannot both spend the same tokens), then its real prompt + completion tokens once it ends.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass

from scheduler.teams.quotas import Subject

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused (429): the message names the limit; Retry-After is when it would pass."""

    message: str
    retry_after_seconds: int
    code: str = "rate_limit_exceeded"


def _retry_after(seconds: float) -> int:
    return max(1, int(math.ceil(seconds)))


def prune(conn: sqlite3.Connection, now_s: float) -> None:
    """Forget admissions older than the window, and reservations whose gateway never settled them."""
    conn.execute("DELETE FROM rate_window WHERE t_unix_s <= ?", (now_s - WINDOW_SECONDS,))
    conn.execute("DELETE FROM inflight WHERE expires_unix_s <= ?", (now_s,))


def check(conn: sqlite3.Connection, subject: Subject, now_s: float, tokens: int) -> Refusal | None:
    """The first of the subject's limits this request would break, or None."""
    lim = subject.limits
    since = now_s - WINDOW_SECONDS
    if lim.requests_per_minute is not None or lim.tokens_per_minute is not None:
        count, used, oldest = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(tokens), 0), MIN(t_unix_s) FROM rate_window WHERE subject = ? AND t_unix_s > ?",
            (subject.name, since)).fetchone()
        if lim.requests_per_minute is not None and count + 1 > lim.requests_per_minute:
            return Refusal(f"{subject.label} is over its limit of requests_per_minute={lim.requests_per_minute}",
                           _retry_after(oldest + WINDOW_SECONDS - now_s))
        if lim.tokens_per_minute is not None and used + tokens > lim.tokens_per_minute:
            if tokens > lim.tokens_per_minute:
                return Refusal(f"this request may use {tokens} tokens (prompt + max_tokens), more than {subject.label}'s "
                               f"limit of tokens_per_minute={lim.tokens_per_minute}; lower max_tokens", 60)
            # the earliest moment enough of the window's tokens have left it
            freed, wait_s = 0, WINDOW_SECONDS
            for t, n in conn.execute("SELECT t_unix_s, tokens FROM rate_window WHERE subject = ? AND t_unix_s > ? "
                                     "ORDER BY t_unix_s", (subject.name, since)):
                freed += n
                if used - freed + tokens <= lim.tokens_per_minute:
                    wait_s = t + WINDOW_SECONDS - now_s
                    break
            return Refusal(f"{subject.label} is over its limit of tokens_per_minute={lim.tokens_per_minute} "
                           f"({used} used in the last minute, this request may use {tokens})", _retry_after(wait_s))
    if lim.concurrent_requests is not None:
        running = conn.execute("SELECT COUNT(*) FROM inflight WHERE subject = ? AND expires_unix_s > ?",
                               (subject.name, now_s)).fetchone()[0]
        if running + 1 > lim.concurrent_requests:
            return Refusal(f"{subject.label} is over its limit of concurrent_requests={lim.concurrent_requests} "
                           f"({running} running)", 1)
    return None


def count(conn: sqlite3.Connection, subject: Subject, now_s: float, tokens: int) -> int | None:
    """Count an admitted request in the subject's minute; returns its row (for the real token count later)."""
    if subject.limits.requests_per_minute is None and subject.limits.tokens_per_minute is None:
        return None
    return conn.execute("INSERT INTO rate_window (subject, t_unix_s, tokens) VALUES (?, ?, ?)",
                        (subject.name, now_s, tokens)).lastrowid


def settle_tokens(conn: sqlite3.Connection, window_id: int, tokens: int) -> None:
    """Replace a finished request's reserved tokens with the tokens it used."""
    conn.execute("UPDATE rate_window SET tokens = ? WHERE id = ?", (tokens, window_id))
