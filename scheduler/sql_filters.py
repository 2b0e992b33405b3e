"""The one filter shape the SQLite stores (energy ledger, power audit log) share: optional column conditions."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, Literal

#: (column, operator, value); a None value means "no condition on this column"
Condition = tuple[str, Literal["=", ">=", "<"], Any]


def where_clause(conditions: Iterable[Condition]) -> tuple[str, list[Any]]:
    """The SQL WHERE clause (with its leading space; empty when nothing applies) and its parameters."""
    clauses, params = [], []
    for column, op, value in conditions:
        if value is not None:
            clauses.append(f"{column} {op} ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


_OPERATORS = {"=": operator.eq, ">=": operator.ge, "<": operator.lt}


def row_matches(row: dict[str, Any], conditions: Iterable[Condition]) -> bool:
    """Whether a row not in the store (yet) passes the conditions where_clause would put on the store's rows."""
    return all(value is None or _OPERATORS[op](row[column], value) for column, op, value in conditions)
