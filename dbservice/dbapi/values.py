"""What crosses from a DB-API caller into a job: parameters the daemon accepts, isolation levels by name.

The daemon decodes a job with an unpickler that admits plain values only
(:mod:`dbservice.jobs`), where psycopg2 adapts any subclass of them. Frameworks
pass such subclasses all the time: Django's ``SafeString`` and its choices
(``TextChoices`` members are ``str``), ``IntEnum`` members, psycopg 3's
``Int4``. They are sent as the plain value they stand for, as psycopg2 would
have quoted them; so is a datetime in a named zone (zoneinfo, pytz, a pandas
Timestamp): as the same instant at its UTC offset, which is all psycopg2
sends of it. Anything else goes as it is, and the daemon says what it refuses.
"""

import datetime
from collections.abc import Mapping
import decimal
import enum
import uuid
from typing import Any, Optional

from psycopg2 import ProgrammingError

_PLAIN = frozenset(
    (
        str, int, float, bool, bytes, type(None), decimal.Decimal, uuid.UUID,
        datetime.date, datetime.time, datetime.timedelta,
    )
)

#: Isolation levels by psycopg2's ISOLATION_LEVEL_* numbers.
_LEVEL_NUMBERS = {1: "READ COMMITTED", 2: "REPEATABLE READ", 3: "SERIALIZABLE", 4: "READ UNCOMMITTED"}
ISOLATION_LEVELS = frozenset(_LEVEL_NUMBERS.values())


def plain_params(params: Any, many: bool) -> Any:
    """*params* (a parameter set, or with *many* a sequence of them) in plain values."""
    if params is None:
        return None
    if many:
        return [plain_params(each, many=False) for each in params]
    kind = type(params)  # the usual cases first, and checked without a copy: this is every statement's path
    if kind is tuple or kind is list:
        for value in params:
            if type(value) not in _PLAIN:
                return [plain(value) for value in params]
        return params
    if kind is dict:
        for key, value in params.items():
            if type(key) is not str or type(value) not in _PLAIN:
                break
        else:
            return params
    if isinstance(params, Mapping):
        # Keys too: SQLAlchemy names a table's columns with quoted_name, a str.
        return {plain(key): plain(value) for key, value in params.items()}
    try:
        return [plain(value) for value in params]
    except TypeError:
        return params  # not a sequence: the daemon says what parameters may be


def plain(value: Any) -> Any:
    """*value* as the plain type it subclasses, inside lists, tuples and dicts too."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind in (list, tuple):
        return kind(plain(item) for item in value)
    if isinstance(value, Mapping):
        return {plain(key): plain(item) for key, item in value.items()}
    if isinstance(value, datetime.datetime):
        return _plain_datetime(value)
    # Each by its contents, not by str() or int(), which an enum overrides.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(memoryview(value))
    return value


def _plain_datetime(value: datetime.datetime) -> datetime.datetime:
    zone = value.tzinfo
    if type(value) is datetime.datetime and (zone is None or type(zone) is datetime.timezone):
        return value
    offset = value.utcoffset()
    return datetime.datetime(
        value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond,
        None if offset is None else datetime.timezone(offset),
    )


def isolation_name(level: object) -> Optional[str]:
    """An isolation level as its SQL name ("REPEATABLE READ"), or None for the server's default.

    It may be given by name (any case, ``_`` for spaces), by psycopg2's
    ISOLATION_LEVEL_* number, or as an enum member, whose name is taken:
    psycopg 2 and psycopg 3 number the levels differently.
    """
    if level is None:
        return None
    if isinstance(level, enum.Enum):
        level = level.name
    if isinstance(level, str):
        name = " ".join(level.replace("_", " ").upper().split())
        if name in ISOLATION_LEVELS:
            return name
    elif isinstance(level, int) and not isinstance(level, bool) and level in _LEVEL_NUMBERS:
        return _LEVEL_NUMBERS[level]
    raise ProgrammingError(
        "unknown isolation level %r; use one of %s, or None for the server's default"
        % (level, ", ".join(sorted(ISOLATION_LEVELS)))
    )
