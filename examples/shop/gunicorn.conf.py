"""gunicorn settings for the shop: 4 worker processes x 4 threads.

Sixteen requests run at once, each thread with a Django connection of its
own, and PostgreSQL sees only the daemon's pool. Any setting can be
overridden on the command line, e.g. ``--bind 0.0.0.0:8080``.
"""

import os

# The project's modules live next to this file, wherever gunicorn is started from.
chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "shop.wsgi:application"
bind = "127.0.0.1:8000"
workers = 4
worker_class = "gthread"
threads = 4
