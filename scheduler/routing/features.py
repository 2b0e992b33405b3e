"""Turn a prompt into the sparse feature vector the adequacy predictor scores (numpy only, no sklearn).

Hashed word unigrams and bigrams plus hashed character 4-grams of the question text, and a few
handcrafted dense cues (length, digits, math and multiple-choice markers, word-problem steps and quantities).
Words hash with crc32, char n-grams with a vectorised polynomial hash, so the same text maps to the same columns in every process (Python's hash() is salted per process).
Training and inference share this one function, so they cannot drift apart.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np

#: width of the hashed part; the dense cues occupy the columns after it
HASH_BITS = 18
N_HASHED = 1 << HASH_BITS
_MASK = N_HASHED - 1

_WORD_RE = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
_NUMBER_RE = re.compile(r"\d+(?:[.,]\d+)?")
_CHOICE_RE = re.compile(r"^[A-D]\.\s", re.MULTILINE)
_SENTENCE_END_RE = re.compile(r"[.?!](?:\s|$)")
_MATH_RE = re.compile(r"[=+*/^<>%$]|\\frac|\\sqrt|\bsolve\b|\bequation\b|\bprobability\b", re.IGNORECASE)
#: char n-grams are costly in pure Python; long prompts only contribute their first characters
_CHAR_LIMIT = 1500
_CHAR_N = 4

DENSE_NAMES = (
    "log_chars",
    "log_words",
    "digit_fraction",
    "log_numbers",
    "multiple_choice",
    "math_markers",
    "question_marks",
    "newlines",
    "uppercase_fraction",
    # word-problem cues: sentences (about one reasoning step each), distinct quantities and the largest one's
    # magnitude; on GSM8K they separate the problems the weak model fails from those it solves better than words do
    "sentences",
    "distinct_numbers",
    "largest_number_magnitude",
    "bias",
)
N_DENSE = len(DENSE_NAMES)
#: prompt formats; every feature is crossed with the format so that, in effect, each format gets its
#: own linear model (difficulty cues in a maths word problem differ from those in a multiple-choice quiz)
FORMATS = ("open", "multiple_choice")
N_FEATURES = N_HASHED + N_DENSE * len(FORMATS)


def _h(token: str, salt: str) -> int:
    return zlib.crc32((salt + token).encode("utf-8", "surrogatepass")) & _MASK


_WORD_HEAD = 160
_WORD_TAIL = 160
#: multipliers for the vectorised char n-gram hash (odd 64-bit constants; uint64 arithmetic wraps)
_POLY = np.uint64(0x100000001B3)
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(64 - HASH_BITS)


def prompt_format(text: str) -> int:
    """0 for open prompts, 1 for multiple-choice ones (two or more lines starting 'A. ', 'B. ' ...)."""
    return 1 if len(_CHOICE_RE.findall(text)) >= 2 else 0


def _word_columns(low: str, fmt: int) -> list[int]:
    words = _WORD_RE.findall(low)
    if len(words) > _WORD_HEAD + _WORD_TAIL:
        # long prompts (reading passages) carry their question and choices at the end
        words = words[:_WORD_HEAD] + words[-_WORD_TAIL:]
    w_salt, b_salt = f"w{fmt}:", f"b{fmt}:"
    cols = [_h(w, w_salt) for w in words]
    cols += [_h(a + " " + b, b_salt) for a, b in zip(words, words[1:])]
    return cols


def _char_columns(codes: np.ndarray, fmt: int) -> np.ndarray:
    """Hash every char 4-gram at once: a polynomial over the code points, then a multiplicative mix."""
    if len(codes) < _CHAR_N:
        return np.empty(0, dtype=np.int64)
    n = len(codes) - _CHAR_N + 1
    h = codes[:n].copy()
    with np.errstate(over="ignore"):
        for k in range(1, _CHAR_N):
            h = h * _POLY + codes[k : k + n]
        h = ((h + np.uint64(fmt + 1) * _POLY) * _MIX) >> _SHIFT
    return h.astype(np.int64)


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def hashed_counts(text: str, fmt: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, counts) for word uni/bigrams and char 4-grams of the whitespace-squashed text."""
    low = text.lower()
    squashed = " ".join(low.split())
    if len(squashed) > 2 * _CHAR_LIMIT:
        squashed = squashed[:_CHAR_LIMIT] + " " + squashed[-_CHAR_LIMIT:]
    cols = np.concatenate([np.asarray(_word_columns(low, fmt), dtype=np.int64), _char_columns(_codes(squashed), fmt)])
    idx, cnt = np.unique(cols, return_counts=True)
    return idx, cnt.astype(np.float64)


def _largest_number(numbers: list[str]) -> float:
    largest = 0.0
    for n in numbers:
        try:
            largest = max(largest, min(float(n.replace(",", "")), 1e12))
        except ValueError:  # "1,2" read as a list, not a number
            continue
    return largest


def dense_features(text: str) -> np.ndarray:
    codes = _codes(text)
    numbers = _NUMBER_RE.findall(text)
    n_chars = max(len(codes), 1)
    digits = int(((codes >= 48) & (codes <= 57)).sum())
    upper = int(((codes >= 65) & (codes <= 90)).sum())
    return np.array(
        [
            math.log1p(len(codes)) / 8.0,
            math.log1p(len(text.split())) / 6.0,
            digits / n_chars * 5.0,
            math.log1p(len(numbers)) / 3.0,
            1.0 if len(_CHOICE_RE.findall(text)) >= 2 else 0.0,
            math.log1p(len(_MATH_RE.findall(text))) / 3.0,
            min(text.count("?"), 5) / 5.0,
            math.log1p(text.count("\n")) / 4.0,
            upper / n_chars * 5.0,
            math.log1p(len(_SENTENCE_END_RE.findall(text))) / 3.0,
            math.log1p(len(set(numbers))) / 3.0,
            math.log1p(_largest_number(numbers)) / 10.0,
            1.0,
        ],
        dtype=np.float64,
    )


def featurize(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(column indices, values) of one prompt: L2-normalised log counts, then the dense cues."""
    fmt = prompt_format(text)
    idx, cnt = hashed_counts(text, fmt)
    val = np.log1p(cnt)
    norm = float(np.sqrt(val @ val)) or 1.0
    val = val / norm
    dense = dense_features(text)
    start = N_HASHED + fmt * N_DENSE
    idx = np.concatenate([idx, np.arange(start, start + N_DENSE, dtype=np.int64)])
    val = np.concatenate([val, dense])
    return idx, val


def featurize_many(texts: list[str]):
    """A scipy CSR matrix of many prompts (training and batch evaluation only)."""
    from scipy import sparse

    indptr = [0]
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    for t in texts:
        i, v = featurize(t)
        indices.append(i)
        data.append(v)
        indptr.append(indptr[-1] + len(i))
    return sparse.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.asarray(indptr)), shape=(len(texts), N_FEATURES)
    )
