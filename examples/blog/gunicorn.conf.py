"""gunicorn settings for the blog: 4 worker processes x 4 threads.

Sixteen requests run at once, yet PostgreSQL sees only the daemon's pool.
Any setting can be overridden on the command line, e.g. ``--bind 0.0.0.0:8080``.
"""

import os

# The app's modules live next to this file, wherever gunicorn is started from.
chdir = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "app:app"
bind = "127.0.0.1:8000"
workers = 4
worker_class = "gthread"
threads = 4
