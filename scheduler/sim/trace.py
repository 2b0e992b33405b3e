"""Read a request trace in the Azure LLM inference format (TIMESTAMP, ContextTokens, GeneratedTokens[, Model]).

Arrival times become seconds since the first request. A file that is missing or does not parse
raises TraceError naming the file, the line and the fix.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """The trace cannot be read; the message says where and how to fix it."""


@dataclass
class Trace:
    arrival_s: np.ndarray  # float seconds since the first request, non-decreasing
    prompt_tokens: np.ndarray  # int
    output_tokens: np.ndarray  # int
    model: list[str] | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.arrival_s)

    def window(self, minutes: float | None = None, speedup: float = 1.0) -> "Trace":
        """The first `minutes` of the trace, with inter-arrival times divided by `speedup`."""
        keep = slice(None) if minutes is None else slice(0, int(np.searchsorted(self.arrival_s, minutes * 60.0, side="left")))
        model = self.model[keep] if self.model is not None else None
        return Trace(self.arrival_s[keep] / speedup, self.prompt_tokens[keep], self.output_tokens[keep], model, self.source)


REQUIRED = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def load_trace(path: str | Path) -> Trace:
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise TraceError(f"{p}: trace file not found; pass an existing CSV to --trace")
    try:
        df = pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise TraceError(f"{p}: not a readable CSV ({str(exc).strip()}); expected columns {', '.join(REQUIRED)}") from None
    except (OSError, EOFError, zlib.error) as exc:
        # pandas picks gzip by the .gz name: a plain or truncated file under that name fails here (BadGzipFile is an OSError)
        raise TraceError(f"{p}: cannot read the trace ({type(exc).__name__}: {str(exc).strip()}); "
                         "pass a CSV, or a gzip-compressed CSV named .gz") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise TraceError(f"{p}: missing column(s) {', '.join(missing)}; the Azure trace format has {', '.join(REQUIRED)}")
    if df.empty:
        raise TraceError(f"{p}: the trace has no requests")
    ts = pd.to_datetime(df["TIMESTAMP"], errors="coerce", format="mixed")
    numeric_ts = pd.to_numeric(df["TIMESTAMP"], errors="coerce")
    if ts.isna().any() and numeric_ts.notna().all():
        seconds = numeric_ts.to_numpy(dtype=float)  # a trace with plain seconds is accepted too
    elif ts.isna().any():
        bad = int(np.flatnonzero(ts.isna().to_numpy())[0])
        raise TraceError(f"{p}: line {bad + 2}: TIMESTAMP {df['TIMESTAMP'].iloc[bad]!r} is not a date-time or a number of seconds")
    else:
        seconds = (ts - ts.iloc[0]).dt.total_seconds().to_numpy(dtype=float)
    cols = {}
    for c in ("ContextTokens", "GeneratedTokens"):
        v = pd.to_numeric(df[c], errors="coerce")
        bad = v.isna() | (v < 0) | (v != v.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise TraceError(f"{p}: line {i + 2}: {c} {df[c].iloc[i]!r} is not a non-negative whole number")
        cols[c] = v.to_numpy(dtype=np.int64)
    order = np.argsort(seconds, kind="stable")
    seconds = seconds[order] - seconds[order][0]
    model = None
    if "Model" in df.columns:
        model = [str(m) for m in df["Model"].to_numpy()[order]]
    return Trace(seconds, np.maximum(cols["ContextTokens"][order], 1), np.maximum(cols["GeneratedTokens"][order], 1), model, str(p))
