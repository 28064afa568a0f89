"""Values survive the trip to the daemon and back, on both intakes."""

import datetime
import decimal
import uuid

import pytest

NOW = datetime.datetime(2026, 11, 21, 12, 30, 15, 123456)
CASES = [
    ("null", "select %s::int", None),
    ("integer", "select %s::int", 42),
    ("bigint", "select %s::bigint", 2**62),
    ("numeric", "select %s::numeric", decimal.Decimal("12345678901234567890.000000001")),
    ("float", "select %s::float8", 3.25),
    ("text", "select %s::text", "héllo, 'world'; -- \" \\ %s {}"),
    ("bytea", "select %s::bytea", bytes(range(256))),
    ("bool", "select %s::bool", True),
    ("date", "select %s::date", datetime.date(2024, 2, 29)),
    ("time", "select %s::time", datetime.time(23, 59, 58, 7)),
    ("timestamp", "select %s::timestamp", NOW),
    ("timestamptz", "select %s::timestamptz", NOW.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=2)))),
    ("interval", "select %s::interval", datetime.timedelta(days=3, seconds=7, microseconds=5)),
    ("uuid", "select %s::uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("json", "select %s::json", {"a": [1, 2.5, None, "x"], "b": {"c": True}}),
    ("jsonb", "select %s::jsonb", {"k": "v", "n": 1}),
    ("int array", "select %s::int[]", [1, 2, None, 4]),
    ("text array", "select %s::text[]", ["a", "b,c", '"q"']),
    ("uuid array", "select %s::uuid[]", [uuid.UUID(int=1), uuid.UUID(int=2)]),
    ("bytea array", "select %s::bytea[]", [b"\x00\x01", b"z"]),
]


@pytest.mark.parametrize("sql, value", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_value_round_trips(client, sql, value):
    result = client.fetchval(sql, [value])
    assert result == value
    assert type(result) is type(value)


def test_timestamptz_comes_back_tz_aware(client):
    value = client.fetchval("select '2024-01-01 12:00:00+00'::timestamptz")
    assert value.tzinfo is not None
    assert value == datetime.datetime(2024, 1, 1, 12, tzinfo=datetime.timezone.utc)


def test_fetch_modes(client):
    sql = "select g, g * 10 from generate_series(1, 3) g"
    assert client.fetchall(sql) == [(1, 10), (2, 20), (3, 30)]
    assert client.fetchone(sql) == (1, 10)
    assert client.fetchval(sql) == 1
    assert client.fetchtable(sql) == (["g", "?column?"], [(1, 10), (2, 20), (3, 30)])
    assert client.fetchone("select 1 where false") is None
    assert client.fetchval("select 1 where false") is None
    assert client.fetchall("select 1 where false") == []


def test_named_parameters(client):
    row = client.fetchone("select %(a)s::int + %(b)s::int, %(a)s::int", {"a": 2, "b": 3})
    assert row == (5, 2)
