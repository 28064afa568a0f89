"""Django on ENGINE "dbservice.django" against a real daemon: migrate, the ORM, atomic, .iterator(), health checks.

Django is configured once per process, so all of it lives in this module,
on a database of its own and a settings module written by the fixture.
"""

import concurrent.futures
import decimal
import os
import sys
import textwrap
import uuid

import psycopg2
import psycopg2.extensions
import pytest

import dbservice
from conftest import start_service

django = pytest.importorskip("django")

MODELS = '''
import uuid

from django.db import models


class Shelf(models.Model):
    name = models.CharField(max_length=50, unique=True)


class Item(models.Model):
    class Kind(models.TextChoices):
        BOOK = "book"
        DISC = "disc"

    shelf = models.ForeignKey(Shelf, on_delete=models.CASCADE, related_name="items")
    title = models.CharField(max_length=200, db_index=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.BOOK)
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    data = models.JSONField(default=dict)
    added = models.DateTimeField(auto_now_add=True)
    key = models.UUIDField(default=uuid.uuid4)
    ip = models.GenericIPAddressField(null=True)
    blob = models.BinaryField(null=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(price__gte=0), name="price_not_negative")]
'''


@pytest.fixture(scope="module")
def django_dsn(dsn):
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    admin.cursor().execute("drop database if exists django_backend")
    admin.cursor().execute("create database django_backend")
    yield psycopg2.extensions.make_dsn(dsn, dbname="django_backend")
    admin.cursor().execute("drop database django_backend with (force)")
    admin.close()


@pytest.fixture(scope="module")
def service(django_dsn, tmp_path_factory):
    directory = tmp_path_factory.mktemp("dj")
    os.chmod(directory, 0o700)
    svc = start_service(django_dsn, str(directory / "dbservice.sock"), max_size=4)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def site(service, tmp_path_factory):
    """Django set up on a settings module and an app of the test's own; migrated."""
    root = tmp_path_factory.mktemp("djsite")
    (root / "shelf").mkdir()
    (root / "shelf" / "__init__.py").write_text("")
    (root / "shelf" / "models.py").write_text(MODELS)
    (root / "dj_settings.py").write_text(textwrap.dedent('''
        SECRET_KEY = "not a secret"
        USE_TZ = True
        DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
        PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast, for tests only
        INSTALLED_APPS = [
            "django.contrib.auth", "django.contrib.contenttypes", "django.contrib.sessions",
            "django.contrib.messages", "django.contrib.admin", "shelf",
        ]
        DATABASES = {
            "default": {
                "ENGINE": "dbservice.django",
                "OPTIONS": {"socket": %r, "authkey": %r, "timeout": 30},
                "CONN_MAX_AGE": 60,
                "CONN_HEALTH_CHECKS": True,
            }
        }
    ''' % (service.socket, service.authkey)))
    sys.path.insert(0, str(root))
    settings_before = os.environ.get("DJANGO_SETTINGS_MODULE")
    os.environ["DJANGO_SETTINGS_MODULE"] = "dj_settings"
    django.setup()
    from django.core.management import call_command

    call_command("makemigrations", "shelf", verbosity=0)
    call_command("migrate", verbosity=0)
    yield root
    from django.db import connections

    connections.close_all()
    sys.path.remove(str(root))
    # Django stays set up in this process, but the processes other tests start must not inherit it.
    if settings_before is None:
        del os.environ["DJANGO_SETTINGS_MODULE"]
    else:
        os.environ["DJANGO_SETTINGS_MODULE"] = settings_before


def open_transactions(service):
    with service.client() as client:
        return client.status()["transactions_open"]


def test_migrate_creates_the_contrib_and_app_tables(site):
    from django.core.management import call_command
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    tables = connection.introspection.table_names()
    assert {"auth_user", "auth_permission", "django_session", "django_admin_log", "shelf_item"} <= set(tables)
    executor = MigrationExecutor(connection)
    assert executor.migration_plan(executor.loader.graph.leaf_nodes()) == []  # nothing left to apply
    constraints = connection.introspection.get_constraints(connection.cursor(), "shelf_item")
    assert constraints["price_not_negative"]["check"]
    description = connection.introspection.get_table_description(connection.cursor(), "shelf_item")
    assert {column.name for column in description} >= {"title", "price", "data", "key"}
    call_command("check", tags=["models", "database"], databases=["default"], verbosity=0)
    assert connection.vendor == "postgresql" and connection.pg_version >= 120000


def test_the_orm(site):
    from django.contrib.auth.models import Group, Permission, User
    from django.db import IntegrityError, transaction
    from django.db.models import Count, Sum
    from shelf.models import Item, Shelf

    editors = Group.objects.create(name="editors")
    editors.permissions.set(Permission.objects.filter(codename__startswith="change_"))
    user = User.objects.create_user("ann", password="s3cret")
    user.groups.add(editors)
    assert User.objects.get(username="ann").check_password("s3cret")
    assert user.has_perm("shelf.change_item")

    shelf = Shelf.objects.create(name="fiction")
    key = uuid.uuid4()
    item = Item.objects.create(
        shelf=shelf, title="The Left Hand of Darkness", kind=Item.Kind.DISC, price=decimal.Decimal("9.50"),
        data={"tags": ["sf", "classic"], "pages": 304, "rating": {"stars": 5}}, key=key, ip="192.0.2.1",
        blob=b"\x00\xff",
    )
    got = Item.objects.get(pk=item.pk)
    assert (got.kind, got.price, got.key, got.ip) == ("disc", decimal.Decimal("9.50"), key, "192.0.2.1")
    assert bytes(got.blob) == b"\x00\xff"
    assert got.data == item.data and got.added.tzinfo is not None
    assert Item.objects.filter(data__pages__gte=300, data__tags__contains=["sf"]).count() == 1
    assert Item.objects.filter(data__contains={"rating": {"stars": 5}}).exists()
    assert Item.objects.filter(data__has_key="tags", data__rating__stars=5).exists()
    assert list(Item.objects.values_list("data__rating", flat=True)) == [{"stars": 5}]
    assert Item.objects.filter(ip="192.0.2.1", key=key, kind=Item.Kind.DISC).exists()

    Item.objects.bulk_create([Item(shelf=shelf, title="bulk %d" % n, price=n) for n in range(20)])
    totals = Shelf.objects.annotate(n=Count("items"), total=Sum("items__price")).get()
    assert (totals.n, totals.total) == (21, decimal.Decimal("9.50") + sum(range(20)))
    assert Item.objects.filter(title__startswith="bulk").update(price=1) == 20
    with pytest.raises(IntegrityError):
        with transaction.atomic():
            Item.objects.create(shelf=shelf, title="negative", price=-1)
    shelf.delete()  # cascades
    assert Item.objects.count() == 0


def test_atomic_with_nested_savepoints(site, service):
    from django.db import IntegrityError, connection, transaction
    from shelf.models import Shelf

    committed = []
    with transaction.atomic():
        Shelf.objects.create(name="outer")
        transaction.on_commit(lambda: committed.append("outer"))
        assert open_transactions(service) == 1
        with pytest.raises(ZeroDivisionError):
            with transaction.atomic():
                Shelf.objects.create(name="inner")
                1 / 0
        try:
            with transaction.atomic():
                Shelf.objects.create(name="outer")  # unique: fails, rolls back to its savepoint
        except IntegrityError:
            pass
        with transaction.atomic():
            Shelf.objects.create(name="kept")
        assert not committed
    assert committed == ["outer"]
    assert sorted(Shelf.objects.values_list("name", flat=True)) == ["kept", "outer"]
    assert connection.get_autocommit() and open_transactions(service) == 0
    Shelf.objects.all().delete()


def test_iterator_streams_from_a_server_side_cursor(site, service):
    from django.db import transaction
    from shelf.models import Item, Shelf

    shelf = Shelf.objects.create(name="many")
    Item.objects.bulk_create([Item(shelf=shelf, title="item %04d" % n) for n in range(500)])
    titles = Item.objects.order_by("title").values_list("title", flat=True).iterator(chunk_size=50)
    assert next(titles) == "item 0000"
    assert open_transactions(service) == 1  # the cursor's own, in autocommit
    assert sum(1 for _ in titles) == 499
    assert open_transactions(service) == 0
    with transaction.atomic():
        assert len(list(Item.objects.iterator(chunk_size=64))) == 500
    shelf.delete()


def test_threads_each_get_a_connection_of_their_own(site):
    from django.db import connection
    from shelf.models import Shelf

    def work(n):
        try:
            Shelf.objects.create(name="thread %d" % n)
            return Shelf.objects.filter(name="thread %d" % n).count()
        finally:
            connection.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, range(40))) == [1] * 40
    Shelf.objects.filter(name__startswith="thread").delete()


def test_health_checks_see_the_daemon_go_and_come_back(site, service):
    """CONN_HEALTH_CHECKS: a persistent connection whose daemon went away is dropped, then reopened."""
    from django.db import OperationalError, close_old_connections, connection
    from shelf.models import Shelf

    Shelf.objects.count()
    persistent = connection.connection
    service.stop()
    close_old_connections()  # a request starts: nothing failed yet, so nothing is checked
    with pytest.raises(OperationalError) as caught:
        Shelf.objects.count()  # the health check finds it unusable, and so does the reconnect
    assert isinstance(caught.value.__cause__, dbservice.ServiceUnavailable)
    assert not connection.is_usable()
    service.start()
    close_old_connections()  # the next request
    assert Shelf.objects.count() == 0
    assert connection.connection is not None
    assert connection.is_usable()
    assert persistent is not None
