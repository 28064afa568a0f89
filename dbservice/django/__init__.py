"""A Django database backend that runs the ORM's SQL through a dbservice daemon.

    DATABASES = {
        "default": {
            "ENGINE": "dbservice.django",
            "OPTIONS": {"socket": "/run/app/dbservice.sock", "timeout": 5},
        }
    }

It is Django's own PostgreSQL backend (:mod:`dbservice.django.base`) on
:mod:`dbservice.dbapi`. ``OPTIONS`` go to ``dbservice.dbapi.connect()``
(``socket``, ``authkey``, ``timeout``, ``connect_timeout``), except
``isolation_level``, which Django applies as it does for PostgreSQL. The
daemon's DSN chooses the database, so ``NAME``, ``USER``, ``PASSWORD``,
``HOST`` and ``PORT`` are not used. It needs ``USE_TZ = True`` (Django's
default).
"""
