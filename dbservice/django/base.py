"""ENGINE "dbservice.django": Django's PostgreSQL backend, with what needs a real psycopg2 connection overridden.

The SQL, the schema editor, introspection and features are Django's
PostgreSQL backend's. What is overridden is what would reach for a psycopg2
(or psycopg 3) connection, and what would set session state on a pooled
connection other clients share:

- the connection is a :mod:`dbservice.dbapi` one, its OPTIONS passed to
  ``connect()``; the isolation level goes into each transaction's BEGIN;
- the time zone is not SET: with ``USE_TZ = True`` every datetime arrives
  aware, and Django's SQL names the zone wherever one matters (``AT TIME
  ZONE``), so the server's own setting does no harm;
- parameter values Django wraps in psycopg2 adapters (``Jsonb``, ``Inet``)
  are sent as plain values, and jsonb, which psycopg2 parses in the daemon,
  is handed to JSONField as the text Django expects from its psycopg2 setup;
- ``.iterator()`` streams through a named cursor, which in autocommit gets a
  daemon transaction of its own instead of Django's WITH HOLD.
"""

import json

import psycopg2.extensions
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.operations import BaseDatabaseOperations
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.backends.postgresql import base as postgresql
from django.db.backends.postgresql.operations import DatabaseOperations as PostgresOperations
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.backends.postgresql.schema import DatabaseSchemaEditor as PostgresSchemaEditor
from django.utils.asyncio import async_unsafe
from django.utils.functional import cached_property

from .. import dbapi

#: OPTIONS of Django's PostgreSQL backend that would change a pooled connection's session, or need psycopg 3.
REFUSED_OPTIONS = {
    "assume_role": "it would SET ROLE on a pooled connection that other clients share",
    "pool": "the daemon is the pool: leave Django's own out",
    "server_side_binding": "psycopg2 binds the parameters in the daemon",
}


def quote(value):
    """*value* as an SQL literal, quoted by psycopg2, for the SQL Django writes out itself (DDL, sqlmigrate)."""
    adapted = psycopg2.extensions.adapt(value)
    if hasattr(adapted, "encoding"):
        adapted.encoding = "utf8"
    return adapted.getquoted().decode()


class DatabaseOperations(PostgresOperations):
    def compose_sql(self, sql, params):
        # Django merges these itself (search configurations, SET ROLE), as with psycopg2's mogrify().
        if isinstance(params, dict):
            return sql % {key: quote(value) for key, value in params.items()}
        return sql % tuple(quote(value) for value in params or ())

    # The SQL as sent: the daemon binds the parameters, so there is no merged query to show.
    last_executed_query = BaseDatabaseOperations.last_executed_query

    def adapt_json_value(self, value, encoder):
        return json.dumps(value, cls=encoder)

    def adapt_ipaddressfield_value(self, value):
        return value or None

    def adapt_integerfield_value(self, value, internal_type):
        return value  # psycopg 3's typed integers are for its server-side binding

    def get_db_converters(self, expression):
        converters = super().get_db_converters(expression)
        if expression.output_field.get_internal_type() == "JSONField":
            converters.append(self._json_as_text)
        return converters

    def _json_as_text(self, value, expression, connection):
        # JSONField decodes text itself, with its own decoder.
        return None if value is None else json.dumps(value)


class DatabaseSchemaEditor(PostgresSchemaEditor):
    def execute(self, sql, params=()):
        # psycopg2 in the daemon binds DDL's parameters too: nothing to merge here.
        return BaseDatabaseSchemaEditor.execute(self, sql, params)

    def quote_value(self, value):
        return quote(value)


class DatabaseWrapper(postgresql.DatabaseWrapper):
    display_name = "PostgreSQL (dbservice)"
    Database = dbapi
    SchemaEditorClass = DatabaseSchemaEditor
    ops_class = DatabaseOperations

    def get_connection_params(self):
        options = dict(self.settings_dict["OPTIONS"])
        for name, why in REFUSED_OPTIONS.items():
            if name in options:
                raise ImproperlyConfigured("the dbservice backend does not take OPTIONS[%r]: %s" % (name, why))
        options.pop("isolation_level", None)  # applied in get_new_connection, as Django's does
        return options

    @async_unsafe
    def get_new_connection(self, conn_params):
        if not settings.USE_TZ:
            raise ImproperlyConfigured(
                "the dbservice backend needs USE_TZ = True: the daemon's pooled connections are shared, "
                "so their TimeZone cannot follow TIME_ZONE as Django would set it"
            )
        level = self.settings_dict["OPTIONS"].get("isolation_level")
        try:
            self.isolation_level = IsolationLevel.READ_COMMITTED if level is None else IsolationLevel(level)
        except ValueError:
            raise ImproperlyConfigured(
                "Invalid transaction isolation level %r specified. Use one of the IsolationLevel values."
                % (level,)
            ) from None
        connection = self.Database.connect(**conn_params)
        if level is not None:
            connection.isolation_level = self.isolation_level  # taken by its name
        return connection

    def _configure_timezone(self, connection):
        return False  # see the module's docstring: no SET TIME ZONE on a shared connection

    @async_unsafe
    def create_cursor(self, name=None):
        if name:
            # In autocommit, the cursor outlives the statement: Django asks for WITH HOLD, and the
            # named cursor gets a daemon transaction of its own instead.
            return self.connection.cursor(name, withhold=self.connection.autocommit)
        return self.connection.cursor()

    def is_usable(self):
        if self.connection is None:
            return False
        try:
            with self.connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except self.Database.Error:
            return False
        return True

    @cached_property
    def pg_version(self):
        with self.temporary_connection() as cursor:
            cursor.execute("SHOW server_version_num")
            return int(cursor.fetchone()[0])
