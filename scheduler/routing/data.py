"""Load routing data (prompt, weak_correct, strong_correct) and make the seeded, stratified held-out split.

Only the standard library and numpy: `wattlane route-eval` must run on an install without pandas.
"""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_COLUMNS = ("prompt", "weak_correct", "strong_correct")
REPO_DIR = Path(__file__).resolve().parents[2]


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


def shared_dir() -> Path:
    """$WATTLANE_SHARED_DIR, else <repo>/../shared (CI puts shared/ beside the clone)."""
    env = os.environ.get("WATTLANE_SHARED_DIR")
    return Path(env) if env else REPO_DIR.parent / "shared"


def _parse_01(value: str, path: str, line: int, column: str) -> int:
    v = value.strip().lower()
    if v in ("1", "1.0", "true"):
        return 1
    if v in ("0", "0.0", "false"):
        return 0
    raise RoutingDataError(f"{path}: line {line}: column '{column}' must be 0 or 1, got {value!r}")


def load_csv(path: str | os.PathLike[str], dataset: str | None = None) -> RoutingData:
    """Read a routing CSV; raise RoutingDataError with a one-line reason for anything wrong."""
    p = Path(path)
    if not p.is_file():
        raise RoutingDataError(f"{p}: file not found")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise RoutingDataError(
                    f"{p}: missing column(s) {', '.join(missing)}; the file needs prompt, weak_correct, strong_correct "
                    f"(found: {', '.join(header) or 'no header'})"
                )
            prompts, weak, strong, subject = [], [], [], []
            for n, row in enumerate(reader, start=2):
                prompts.append(row["prompt"] or "")
                weak.append(_parse_01(row["weak_correct"] or "", str(p), n, "weak_correct"))
                strong.append(_parse_01(row["strong_correct"] or "", str(p), n, "strong_correct"))
                subject.append(row.get("subject") or "")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RoutingDataError(f"{p}: cannot be read as CSV: {exc}") from None
    if not prompts:
        raise RoutingDataError(f"{p}: no data rows")
    name = dataset or p.stem
    return RoutingData(prompts, np.asarray(weak, np.int8), np.asarray(strong, np.int8), [name] * len(prompts), subject)


def concat(parts: list[RoutingData]) -> RoutingData:
    return RoutingData(
        prompts=[x for d in parts for x in d.prompts],
        weak_correct=np.concatenate([d.weak_correct for d in parts]),
        strong_correct=np.concatenate([d.strong_correct for d in parts]),
        dataset=[x for d in parts for x in d.dataset],
        subject=[x for d in parts for x in d.subject],
    )


def load_shared() -> RoutingData:
    """MMLU and GSM8K from the shared routing folder, tagged by dataset."""
    base = shared_dir() / "routing"
    return concat([load_csv(base / "mmlu.csv", "mmlu"), load_csv(base / "gsm8k.csv", "gsm8k")])


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
