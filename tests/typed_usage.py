"""What a type checker sees of the public API, as an application uses it.

mypy checks this file in CI with the public modules (pyproject.toml's
[tool.mypy]); it is never run. Each assert_type fails the check if what a
call returns is typed otherwise, or as Any.
"""

import datetime
import io
from typing import Any, Dict, List, Optional, Tuple, Union

from typing_extensions import assert_type

import dbservice
from dbservice import dbapi
from dbservice.config import Settings
from dbservice.jobs import FETCH_ONE, Job

Row = Tuple[Any, ...]


def blocking(db: dbservice.Client) -> None:
    assert_type(db.fetchall("select id from posts where id > %s", [10]), List[Row])
    assert_type(db.fetchone("select * from posts where id = %(id)s", {"id": 1}), Optional[Row])
    assert_type(db.fetchtable("select 1"), Tuple[List[str], List[Row]])
    assert_type(db.execute("delete from posts"), int)
    assert_type(db.executemany("insert into tags values (%s, %s)", [(1, "a")]), int)
    assert_type(db.status(), Dict[str, Any])
    with db.transaction(isolation_level="repeatable read") as tx:
        assert_type(tx, dbservice.client.Transaction)
        assert_type(tx.fetchone("select 1"), Optional[Row])
    for row in db.iterate("select id from posts", batch=100):
        assert_type(row, Row)
    assert_type(db.copy_from(io.StringIO("1\tone\n"), "posts", columns=["id", "title"]), int)
    assert_type(db.copy_expert("COPY posts TO STDOUT", io.BytesIO()), int)
    assert_type(db.notify("posts", "1"), int)
    with db.listen("posts", timeout=1) as posts:
        for item in posts:
            assert_type(item, Union[dbservice.Notification, dbservice.NotificationsLost])
            if isinstance(item, dbservice.Notification):
                assert_type(item.pid, int)


async def awaiting() -> None:
    async with dbservice.connect_async(timeout=5) as db:
        assert_type(db, dbservice.AsyncClient)
        assert_type(await db.fetchall("select 1"), List[Row])
        assert_type(await db.fetchone("select 1"), Optional[Row])
        assert_type(await db.execute("select 1"), int)
        async with db.transaction() as tx:
            assert_type(await tx.fetchtable("select 1"), Tuple[List[str], List[Row]])
        async for row in db.iterate("select 1"):
            assert_type(row, Row)
        assert_type(await db.copy_to(io.StringIO(), "posts"), int)
        async with db.listen("posts") as posts:
            assert_type(await posts.receive(1), Optional[Union[dbservice.Notification, dbservice.NotificationsLost]])
        assert_type(await db.run(Job("select 1", None, FETCH_ONE)), Any)
    assert_type(await dbservice.connect_async(), dbservice.AsyncClient)


def service() -> None:
    with dbservice.DBService("dbname=app", max_size=4) as svc:
        client = svc.client(timeout=5)
        assert_type(client, Union[dbservice.QueueClient, dbservice.Client])
        assert_type(client.fetchall("select 1"), List[Row])


def db_api() -> None:
    with dbapi.connect(timeout=5, isolation_level="serializable") as conn:
        assert_type(conn, dbapi.Connection)
        cur = conn.cursor()
        cur.execute("select %s::int", [1])
        assert_type(cur.fetchone(), Optional[Row])
        assert_type(cur.fetchmany(10), List[Row])
        assert_type(cur.description, Optional[Tuple[dbapi.Column, ...]])
        if cur.description is not None:
            assert_type(cur.description[0].type_code, int)
        cur.copy_from(io.StringIO("1\n"), "posts", columns=["id"])
        conn.listen("posts")
        assert_type(conn.poll(), int)
        assert_type(conn.notifies, List[Any])
    assert_type(dbapi.TimestampFromTicks(0.0), datetime.datetime)


async def db_api_async() -> None:
    conn = await dbapi.connect_async()
    cur = conn.cursor()
    await cur.execute("select 1")
    assert_type(await cur.fetchall(), List[Row])
    await conn.commit()


def settings_and_errors(error: Exception) -> None:
    settings = Settings(dsn="dbname=app", max_size=20)
    assert_type(settings.max_size, int)
    assert_type(settings.dsn, Optional[str])
    if isinstance(error, dbservice.QueryTimeout):
        assert_type(error.pgcode, Optional[str])  # a psycopg2.Error too
