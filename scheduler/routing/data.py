"""Load routing data (prompt, weak_correct, strong_correct), remove duplicate prompts and make the seeded, stratified held-out split.

Only the standard library and numpy: `wattlane route-eval` must run on an install without pandas.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler import datafiles

REQUIRED_COLUMNS = ("prompt", "weak_correct", "strong_correct")
#: written by write_csv; load_csv takes dataset and subject from these when present
COLUMNS = ("dataset", "subject", "prompt", "weak_correct", "strong_correct")


class RoutingDataError(ValueError):
    """The routing CSV is missing, unreadable or lacks a required column (CLI exit status 2)."""


@dataclass
class RoutingData:
    prompts: list[str]
    weak_correct: np.ndarray  # int8 0/1
    strong_correct: np.ndarray  # int8 0/1
    #: which benchmark each row comes from ("mmlu", "gsm8k", or the file stem)
    dataset: list[str]
    #: MMLU subject where known, else ""
    subject: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: np.ndarray) -> "RoutingData":
        idx = [int(i) for i in index]
        return RoutingData(
            prompts=[self.prompts[i] for i in idx],
            weak_correct=self.weak_correct[index],
            strong_correct=self.strong_correct[index],
            dataset=[self.dataset[i] for i in idx],
            subject=[self.subject[i] for i in idx],
        )

    @property
    def strong_needed(self) -> np.ndarray:
        """1 where only the strong model is right: the rows a router should send to it."""
        return ((self.strong_correct == 1) & (self.weak_correct == 0)).astype(np.int8)


def _parse_01(value: str, path: str, line: int, column: str) -> int:
    v = value.strip().lower()
    if v in ("1", "1.0", "true"):
        return 1
    if v in ("0", "0.0", "false"):
        return 0
    raise RoutingDataError(f"{path}: line {line}: column '{column}' must be 0 or 1, got {value!r}")


def _open_text(p: Path):
    if p.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", newline="")
    return p.open(newline="", encoding="utf-8")


def load_csv(path: str | os.PathLike[str], dataset: str | None = None) -> RoutingData:
    """Read a routing CSV (plain or .gz); raise RoutingDataError with a one-line reason for anything wrong."""
    p = Path(path)
    if not p.is_file():
        raise RoutingDataError(f"{p}: file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    default_dataset = dataset or p.name.split(".")[0]
    try:
        with _open_text(p) as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise RoutingDataError(
                    f"{p}: missing column(s) {', '.join(missing)}; the file needs prompt, weak_correct, strong_correct "
                    f"(found: {', '.join(header) or 'no header'})"
                )
            prompts, weak, strong, subject, names = [], [], [], [], []
            for n, row in enumerate(reader, start=2):
                prompts.append(row["prompt"] or "")
                weak.append(_parse_01(row["weak_correct"] or "", str(p), n, "weak_correct"))
                strong.append(_parse_01(row["strong_correct"] or "", str(p), n, "strong_correct"))
                subject.append(row.get("subject") or "")
                names.append(dataset or row.get("dataset") or default_dataset)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, gzip.BadGzipFile) as exc:
        raise RoutingDataError(f"{p}: cannot be read as CSV: {exc}") from None
    if not prompts:
        raise RoutingDataError(f"{p}: no data rows")
    return RoutingData(prompts, np.asarray(weak, np.int8), np.asarray(strong, np.int8), names, subject)


def write_csv(data: RoutingData, path: Path) -> None:
    """Write rows with every COLUMNS field; a .gz path is gzipped with no timestamp, so equal data gives equal bytes."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for i in range(len(data)):
        w.writerow([data.dataset[i], data.subject[i], data.prompts[i], int(data.weak_correct[i]), int(data.strong_correct[i])])
    raw = buf.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0) if path.name.endswith(".gz") else raw)
    tmp.replace(path)


def concat(parts: list[RoutingData]) -> RoutingData:
    return RoutingData(
        prompts=[x for d in parts for x in d.prompts],
        weak_correct=np.concatenate([d.weak_correct for d in parts]),
        strong_correct=np.concatenate([d.strong_correct for d in parts]),
        dataset=[x for d in parts for x in d.dataset],
        subject=[x for d in parts for x in d.subject],
    )


def load_training_data() -> RoutingData:
    """MMLU and GSM8K routing labels from data/routing of the source checkout, tagged by dataset."""
    try:
        paths = {name: datafiles.routing_csv(name) for name in ("mmlu", "gsm8k")}
    except datafiles.DataFileError as exc:
        raise RoutingDataError(str(exc)) from None
    return concat([load_csv(path, name) for name, path in paths.items()])


_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalise_prompt(text: str) -> str:
    """Lower case, letters and digits only, single spaces: two prompts that differ only in case, spacing or
    punctuation are the same question (MMLU files the same question under two subjects)."""
    return _NON_ALNUM.sub(" ", text.lower()).strip()


@dataclass
class DedupeReport:
    rows_in: int
    duplicate_groups: int  # normalised prompts seen more than once
    conflicting_groups: int  # of those, groups whose (weak, strong) outcomes disagree: dropped whole
    rows_out: int

    def as_dict(self) -> dict:
        return {
            "rows_in": self.rows_in, "duplicate_groups": self.duplicate_groups,
            "conflicting_groups_dropped": self.conflicting_groups, "rows_out": self.rows_out,
            "rule": "prompts equal after normalise_prompt() are one question: kept once (first row) when every copy has the "
            "same (weak_correct, strong_correct); dropped entirely when the copies disagree",
        }


def dedupe(data: RoutingData) -> tuple[RoutingData, DedupeReport]:
    """One row per normalised prompt, so no question can sit in both halves of a split.

    Copies with the same outcome keep their first row. Copies whose labels disagree are dropped: the same
    models answered the same question both ways, so neither label is the question's, and keeping one
    would be a coin flip."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(data.prompts):
        groups.setdefault(normalise_prompt(p), []).append(i)
    keep, dup, conflict = [], 0, 0
    for rows in groups.values():
        if len(rows) > 1:
            dup += 1
            if len({(int(data.weak_correct[i]), int(data.strong_correct[i])) for i in rows}) > 1:
                conflict += 1
                continue
        keep.append(rows[0])
    idx = np.asarray(sorted(keep), dtype=np.int64)
    return data.subset(idx), DedupeReport(len(data), dup, conflict, len(idx))


def stratified_split(data: RoutingData, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, stratified by dataset, subject and the (weak, strong) outcome pair."""
    rng = np.random.default_rng(seed)
    strata: dict[tuple, list[int]] = {}
    for i in range(len(data)):
        key = (data.dataset[i], data.subject[i], int(data.weak_correct[i]), int(data.strong_correct[i]))
        strata.setdefault(key, []).append(i)
    train, test = [], []
    for key in sorted(strata):
        rows = np.asarray(strata[key])
        rng.shuffle(rows)
        # probabilistic rounding keeps the overall fraction right when strata are tiny
        exact = test_fraction * len(rows)
        k = int(exact) + (1 if rng.random() < exact - int(exact) else 0)
        test.extend(rows[:k].tolist())
        train.extend(rows[k:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))
