"""pandas and Alembic through postgresql+dbservice://, against a real daemon."""

import textwrap

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from conftest import write_secret


@pytest.fixture(scope="module")
def url(socket_service):
    write_secret(socket_service)
    return "postgresql+dbservice://?socket=%s" % socket_service.socket


@pytest.fixture(scope="module")
def engine(url):
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


def test_pandas_to_sql_and_read_sql(engine):
    n = 1000
    frame = pd.DataFrame(
        {
            "id": np.arange(n),
            "name": ["row %d" % i for i in range(n)],
            "price": np.arange(n) * 0.25,
            "at": pd.date_range("2026-01-01", periods=n, freq="h", tz="UTC"),
            "local": pd.date_range("2026-03-29", periods=n, freq="min", tz="Europe/Paris"),  # a DST change
            "flag": np.arange(n) % 2 == 0,
            "maybe": [None if i % 3 else i * 1.5 for i in range(n)],
        }
    )
    frame.to_sql("pd_frame", engine, index=False, if_exists="replace")
    try:
        back = pd.read_sql("select * from pd_frame order by id", engine)
        # The same instants, as PostgreSQL gives them back: in UTC.
        expected = frame.assign(local=frame["local"].dt.tz_convert("UTC"))
        pd.testing.assert_frame_equal(back, expected)
        chunks = pd.read_sql(
            sa.text("select id from pd_frame where id < :n order by id"), engine, params={"n": 250}, chunksize=100
        )
        assert [len(chunk) for chunk in chunks] == [100, 100, 50]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("drop table pd_frame"))


def test_an_alembic_migration_up_and_down(url, engine, tmp_path):
    config = Config(str(tmp_path / "alembic.ini"))  # as `alembic init migrations` makes it
    command.init(config, str(tmp_path / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    (tmp_path / "migrations" / "versions" / "0001_notes.py").write_text(textwrap.dedent('''
        import sqlalchemy as sa
        from alembic import op

        revision = "0001"
        down_revision = None

        def upgrade():
            op.create_table(
                "alembic_notes",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("body", sa.Text, nullable=False),
            )
            op.create_index("alembic_notes_body", "alembic_notes", ["body"])
            op.bulk_insert(sa.table("alembic_notes", sa.column("body")), [{"body": "first"}])

        def downgrade():
            op.drop_table("alembic_notes")
    '''))
    command.upgrade(config, "head")
    inspector = sa.inspect(engine)
    assert "alembic_notes" in inspector.get_table_names()
    assert [i["name"] for i in inspector.get_indexes("alembic_notes")] == ["alembic_notes_body"]
    with engine.connect() as conn:
        assert conn.scalar(sa.text("select version_num from alembic_version")) == "0001"
        assert conn.scalar(sa.text("select body from alembic_notes")) == "first"
    command.downgrade(config, "base")
    assert "alembic_notes" not in sa.inspect(engine).get_table_names()
