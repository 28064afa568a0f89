"""SQLAlchemy on postgresql+dbservice:// against a real daemon: Core, ORM, reflection, streaming, asyncio."""

import asyncio
import concurrent.futures
import datetime
import decimal
import uuid

import psycopg2.errors
import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import dbservice
from conftest import start_service, write_secret


@pytest.fixture(scope="module")
def service(socket_service):
    return write_secret(socket_service)  # for the URL that names only the socket


@pytest.fixture(scope="module")
def engine(service):
    address = {"socket": service.socket, "authkey": service.authkey, "timeout": 30}
    engine = sa.create_engine("postgresql+dbservice://", connect_args=address)
    yield engine
    engine.dispose()


def open_transactions(service):
    with service.client() as client:
        return client.status()["transactions_open"]


class Base(orm.DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "sa_authors"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    name: orm.Mapped[str] = orm.mapped_column(sa.String(50), unique=True)
    books: orm.Mapped[list["Book"]] = orm.relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "sa_books"
    id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
    title: orm.Mapped[str]
    author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey("sa_authors.id"))
    author: orm.Mapped[Author] = orm.relationship(back_populates="books")


@pytest.fixture(scope="module")
def schema(engine):
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield
    Base.metadata.drop_all(engine)


def test_the_url_names_the_socket_and_nothing_the_daemon_chooses(service):
    engine = sa.create_engine("postgresql+dbservice://?socket=%s&timeout=5" % service.socket)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select current_database()")) == "test"
    assert engine.dialect.driver == "dbservice" and engine.dialect.name == "postgresql"
    engine.dispose()
    for url in ("postgresql+dbservice://user@host/db", "postgresql+dbservice://?sockets=/x"):
        with pytest.raises(sa.exc.ArgumentError):
            sa.create_engine(url).connect()


def test_core_values_round_trip(engine):
    kinds = sa.Enum("red", "green", name="sa_colour")
    table = sa.Table(
        "sa_values", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("price", sa.Numeric(10, 2)),
        sa.Column("ratio", sa.Numeric(10, 4, asdecimal=False)),
        sa.Column("weight", sa.Float),
        sa.Column("at", sa.DateTime(timezone=True)),
        sa.Column("day", sa.Date),
        sa.Column("wait", sa.Interval),
        sa.Column("doc", postgresql.JSONB),
        sa.Column("tags", postgresql.ARRAY(sa.Integer)),
        sa.Column("blob", sa.LargeBinary),
        sa.Column("key", sa.Uuid),
        sa.Column("colour", kinds),
        sa.Column("ok", sa.Boolean),
    )
    row = {
        "id": 1, "price": decimal.Decimal("12.30"), "ratio": 0.25, "weight": 2.5,
        "at": datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2026, 11, 21), "wait": datetime.timedelta(minutes=3),
        "doc": {"a": [1, 2], "b": None}, "tags": [3, 1, 2], "blob": b"\x00\xff", "key": uuid.uuid4(),
        "colour": "green", "ok": True,
    }
    table.metadata.drop_all(engine)
    table.metadata.create_all(engine)
    try:
        with engine.begin() as conn:
            conn.execute(table.insert(), [row, dict(row, id=2, doc=[], tags=[])])
        with engine.connect() as conn:
            got = conn.execute(sa.select(table).where(table.c.id == 1)).mappings().one()
            assert dict(got) == row
            assert isinstance(got["ratio"], float) and isinstance(got["price"], decimal.Decimal)
            assert conn.scalar(sa.select(table.c.doc["a"][1].as_integer()).where(table.c.id == 1)) == 2
            assert conn.scalar(sa.select(sa.func.count()).where(table.c.tags.contains([1]))) == 1
    finally:
        table.metadata.drop_all(engine)


def test_insert_many_returning_and_rowcounts(engine, schema):
    authors = Author.__table__
    with engine.begin() as conn:
        ids = conn.execute(
            authors.insert().returning(authors.c.id, sort_by_parameter_order=True),
            [{"name": "many-%d" % n} for n in range(50)],
        ).scalars().all()
        assert len(ids) == 50 and ids == sorted(ids)
        renamed = authors.update().where(authors.c.name.like("many-%")).values(name=authors.c.name + "!")
        updated = conn.execute(renamed)
        assert updated.rowcount == 50
        assert conn.execute(authors.delete().where(authors.c.id.in_(ids))).rowcount == 50


def test_orm_sessions_relationships_and_rollback(engine, schema):
    Session = orm.sessionmaker(engine)
    with Session.begin() as session:
        session.add(Author(name="Le Guin", books=[Book(title="The Dispossessed"), Book(title="Lathe of Heaven")]))
    with Session() as session:
        author = session.scalars(
            sa.select(Author).options(orm.selectinload(Author.books)).where(Author.name == "Le Guin")
        ).one()
        assert [book.title for book in author.books] == ["The Dispossessed", "Lathe of Heaven"]
        session.add(Author(name="Le Guin"))
        with pytest.raises(sa.exc.IntegrityError) as caught:
            session.flush()
        assert isinstance(caught.value.orig, psycopg2.errors.UniqueViolation)
        session.rollback()
        author.books.append(Book(title="Tehanu"))
        session.commit()
        assert session.scalar(sa.select(sa.func.count(Book.id)).join(Author).where(Author.name == "Le Guin")) == 3
        session.delete(author.books[0])
        session.rollback()  # never happened
        assert session.scalar(sa.select(sa.func.count(Book.id))) == 3


def test_reflection(engine, schema):
    inspector = sa.inspect(engine)
    assert {"sa_authors", "sa_books"} <= set(inspector.get_table_names())
    assert [c["name"] for c in inspector.get_columns("sa_books")] == ["id", "title", "author_id"]
    assert inspector.get_foreign_keys("sa_books")[0]["referred_table"] == "sa_authors"
    reflected = sa.MetaData()
    reflected.reflect(engine, only=["sa_authors"])
    assert isinstance(reflected.tables["sa_authors"].c.name.type, sa.String)


def test_stream_results_and_yield_per_use_a_server_side_cursor(engine, schema, service):
    with engine.connect() as conn:
        result = conn.execute(
            sa.select(sa.func.generate_series(1, 10000).label("n")).execution_options(
                stream_results=True, max_row_buffer=50
            )
        )
        first = next(iter(result))
        assert first.n == 1
        # The rows wait on the server, in its cursor.
        assert conn.scalar(sa.text("select count(*) from pg_cursors where name <> ''")) == 1
        assert sum(row.n for row in result) == sum(range(2, 10001))
    with orm.Session(engine) as session:
        session.add_all([Author(name="yield-%d" % n) for n in range(30)])
        session.flush()
        partitions = session.execute(
            sa.select(Author).where(Author.name.like("yield-%")).execution_options(yield_per=10)
        ).scalars().partitions()
        assert [len(p) for p in partitions] == [10, 10, 10]
        session.rollback()
    assert open_transactions(service) == 0


def test_isolation_levels_and_autocommit_go_into_each_begin(engine, service):
    with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
        assert conn.scalar(sa.text("show transaction_isolation")) == "serializable"
        assert conn.get_isolation_level() == "SERIALIZABLE"
    with engine.connect() as conn:  # given back to the pool with its default again
        assert conn.scalar(sa.text("show transaction_isolation")) == "read committed"
    with engine.connect().execution_options(postgresql_readonly=True) as conn:
        with pytest.raises(sa.exc.InternalError):  # ReadOnlySqlTransaction
            conn.execute(sa.text("create temporary table never (n int)"))
    options = {"isolation_level": "SERIALIZABLE", "postgresql_readonly": True, "postgresql_deferrable": True}
    with engine.connect().execution_options(**options) as conn:
        assert conn.scalar(sa.text("show transaction_deferrable")) == "on"
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("select 1"))
        assert open_transactions(service) == 0  # autocommit pins no pooled connection
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))
        assert open_transactions(service) == 1
    assert open_transactions(service) == 0  # the pool's reset rolled it back


def test_a_pool_of_threads_shares_the_daemons_connections(service):
    engine = sa.create_engine(
        "postgresql+dbservice://", pool_size=16, max_overflow=0,
        connect_args={"socket": service.socket, "authkey": service.authkey, "timeout": 30},
    )

    def work(n):
        with engine.begin() as conn:
            return conn.scalar(sa.text("select :n + count(*) from pg_stat_activity where pid = pg_backend_pid()"),
                               {"n": n})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert sorted(pool.map(work, range(400))) == [n + 1 for n in range(400)]
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_a_lost_daemon_is_a_disconnect_and_the_pool_recovers(dsn, socket_path):
    svc = start_service(dsn, socket_path, min_size=1, max_size=2)
    engine = sa.create_engine(
        "postgresql+dbservice://", connect_args={"socket": socket_path, "authkey": svc.authkey, "timeout": 30}
    )
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        conn = engine.connect()
        conn.execute(sa.text("select 1"))  # a transaction is open when the daemon goes
        svc.stop()
        svc.start()
        with pytest.raises(sa.exc.OperationalError) as caught:
            conn.execute(sa.text("select 2"))
        assert caught.value.connection_invalidated
        assert isinstance(caught.value.orig, dbservice.ServiceUnavailable)
        conn.rollback()
        assert conn.scalar(sa.text("select 3")) == 3  # a new connection
        conn.close()
        with engine.connect() as conn:
            assert conn.scalar(sa.text("select 4")) == 4
    finally:
        engine.dispose()
        svc.stop()


def test_the_asyncio_extension(service, schema):
    async def main():
        engine = create_async_engine(
            "postgresql+dbservice://", connect_args={"socket": service.socket, "authkey": service.authkey}
        )
        assert engine.dialect.is_async
        async with engine.begin() as conn:
            await conn.execute(Author.__table__.insert(), [{"name": "async-%d" % n} for n in range(20)])
        async with engine.connect() as conn:
            names = sa.select(Author.name).where(Author.name.like("async-%")).order_by(Author.id)
            result = await conn.stream(names)
            assert [name async for name in result.scalars()] == ["async-%d" % n for n in range(20)]
        async with AsyncSession(engine) as session:
            author = Author(name="async-orm", books=[Book(title="one")])
            session.add(author)
            await session.commit()
            loaded = await session.scalar(
                sa.select(Author).options(orm.selectinload(Author.books)).where(Author.name == "async-orm")
            )
            assert [book.title for book in loaded.books] == ["one"]
            await session.delete(loaded)
            await session.rollback()

        async def count(n):
            async with engine.connect() as conn:
                return await conn.scalar(sa.text("select :n + count(*) from sa_authors where name like 'async-%'"),
                                         {"n": n})

        assert await asyncio.gather(*(count(n) for n in range(20))) == [n + 21 for n in range(20)]
        async with engine.begin() as conn:
            await conn.execute(sa.text("delete from sa_books; delete from sa_authors where name like 'async%'"))
        await engine.dispose()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert open_transactions(service) == 0
