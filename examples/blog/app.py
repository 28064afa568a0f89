"""The example blog: a Flask app whose every query goes through dbservice.

Run it with gunicorn (see gunicorn.conf.py) against a running dbserviced;
``flask --app examples/blog/app.py init-db`` loads the schema and sample data
(sql/blog.sql).
"""

import os

import click
from flask import Flask, abort, render_template, request

import dbservice
import posts
from db import get_db

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "sql", "blog.sql")

#: Page numbers above this are refused, so an offset never overflows.
MAX_PAGE = 100000

app = Flask(__name__)


@app.get("/")
def index():
    page = posts.recent(get_db(), _page_number())
    return render_template("posts.html", page=page, link_args={})


@app.get("/tag/<name>")
def tag(name):
    page = posts.tagged(get_db(), name, _page_number())
    if page.number == 1 and not page.posts:
        abort(404)
    return render_template("posts.html", page=page, link_args={"name": name}, heading="Tagged " + name)


@app.get("/search")
def search():
    text = request.args.get("q", "").strip()
    if not text:
        return render_template("posts.html", page=None, query="")
    page = posts.search(get_db(), text, _page_number())
    return render_template(
        "posts.html", page=page, link_args={"q": text}, query=text, heading="Search: " + text
    )


@app.get("/post/<int:post_id>")
def post(post_id):
    found = posts.get(get_db(), post_id)
    if found is None:
        abort(404)
    return render_template("post.html", post=found)


@app.errorhandler(dbservice.Error)
def database_unavailable(error):
    app.logger.error("the database service failed: %s: %s", type(error).__name__, error)
    return render_template("error.html", message="The database is not answering. Try again shortly."), 503


@app.cli.command("init-db")
def init_db():
    """Create the blog's tables and sample posts (dropping any old ones)."""
    with open(SCHEMA, encoding="utf-8") as f:
        script = f.read()
    # No parameters: the script's own text is the SQL, run as one transaction.
    get_db().execute(script, timeout=60)
    click.echo("loaded %s" % os.path.normpath(SCHEMA))


def _page_number():
    number = request.args.get("page", 1, type=int)
    if not 1 <= number <= MAX_PAGE:
        abort(404)
    return number
