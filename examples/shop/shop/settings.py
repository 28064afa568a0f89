"""The shop's settings: Django on the dbservice daemon that ``dbservice.connect()`` finds.

The database is the daemon's: ``dbserviced start`` (with ``--dsn``, or its
own PostgreSQL), found through $DBSERVICE_HOME or $DBSERVICE_SOCKET.
"""

import os

SECRET_KEY = os.environ.get("SHOP_SECRET_KEY", "an example's key: set SHOP_SECRET_KEY in production")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "store"]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "shop.urls"
WSGI_APPLICATION = "shop.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "dbservice.django",
        # Passed to dbservice.dbapi.connect(): the default daemon, and a limit per query
        # (its wait in the daemon's queue included), so a page fails fast rather than hang.
        "OPTIONS": {"timeout": 5},
        # Each thread keeps its connection to the daemon (a socket, not a PostgreSQL
        # backend) between requests, and checks it first when the last request failed.
        "CONN_MAX_AGE": 300,
        "CONN_HEALTH_CHECKS": True,
    }
}
