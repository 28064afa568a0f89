"""The example blog end to end: PostgreSQL, the dbservice daemon and gunicorn
run as real processes, and the tests drive the site over HTTP."""

import collections
import concurrent.futures
import html.parser
import json
import os
import signal
import subprocess
import sys
import urllib.parse

import psycopg2
import psycopg2.extensions
import pytest

from dbservice.config import StateDir
from dbservice.pidfile import running_pid
from webserver import get, gunicorn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOG = os.path.join(ROOT, "examples", "blog")
PAGE_SIZE = 10
NEWEST_FIRST = " order by published_at desc, id desc"


@pytest.fixture(scope="module")
def blog_dsn(dsn):
    """A database of the blog's own in the session's PostgreSQL."""
    admin = psycopg2.connect(dsn)
    admin.autocommit = True
    admin.cursor().execute("drop database if exists blog")
    admin.cursor().execute("create database blog")
    yield psycopg2.extensions.make_dsn(dsn, dbname="blog")
    admin.cursor().execute("drop database blog with (force)")
    admin.close()


@pytest.fixture(scope="module")
def blog_db(blog_dsn):
    """A plain psycopg2 connection to the blog's database: what the pages should show."""
    conn = psycopg2.connect(blog_dsn)
    conn.autocommit = True
    yield conn.cursor()
    conn.close()


@pytest.fixture(scope="module")
def state_dir(blog_dsn, tmp_path_factory):
    """A dbserviced on the blog's database, started by its CLI; yields its state directory.

    The app finds it as ``dbservice.connect()`` finds any daemon: through
    $DBSERVICE_HOME, the state directory holding the socket and the secret.
    """
    # Unix socket paths are limited to ~107 bytes: keep them short.
    path = str(tmp_path_factory.mktemp("blog"))
    started = dbserviced(path, "start", "--dsn", blog_dsn, "--min-size", "2", "--max-size", "4")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield path
    finally:
        pid = running_pid(StateDir(path).pidfile)
        dbserviced(path, "stop", "--force")
        if pid is not None and running_pid(StateDir(path).pidfile) is not None:
            os.kill(pid, signal.SIGKILL)  # it would not stop: do not leave it behind


def dbserviced(state_dir, *args):
    """Run ``dbserviced ARGS`` on *state_dir*; the CompletedProcess, output as text."""
    return subprocess.run(
        [sys.executable, "-m", "dbservice.cli", *args],
        env=_env(state_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=90,
    )


def _env(state_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DBSERVICE_")}
    env["DBSERVICE_HOME"] = state_dir
    return env


def _jobs_per_connection(state_dir):
    status = dbserviced(state_dir, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    return {c["number"]: c["jobs_done"] for c in json.loads(status.stdout)["connections"]}


@pytest.fixture(scope="module")
def site(state_dir, tmp_path_factory):
    """The blog's sample data loaded with ``flask init-db``, served by gunicorn; yields its base URL."""
    env = _env(state_dir)
    init = subprocess.run(
        [sys.executable, "-m", "flask", "--app", os.path.join(BLOG, "app.py"), "init-db"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
    )
    assert init.returncode == 0, init.stdout.decode(errors="replace")
    config = os.path.join(BLOG, "gunicorn.conf.py")
    with gunicorn(["-c", config], env, tmp_path_factory.mktemp("gunicorn")) as url:
        yield url


def _page(url):
    status, body = get(url)
    assert status == 200, "%s answered %s: %s" % (url, status, body[:2000])
    return body


class _TextOfClass(html.parser.HTMLParser):
    """The text of every element of one CSS class, in page order, with entities decoded."""

    def __init__(self, css_class):
        super().__init__()
        self.css_class = css_class
        self.found = []
        self._inside = False

    def handle_starttag(self, tag, attrs):
        if self.css_class in (dict(attrs).get("class") or "").split():
            self.found.append("")
            self._inside = True

    def handle_endtag(self, tag):
        self._inside = False

    def handle_data(self, data):
        if self._inside:
            self.found[-1] += data


def _text_of(body, css_class):
    parser = _TextOfClass(css_class)
    parser.feed(body)
    parser.close()
    return parser.found


def _titles(body):
    return _text_of(body, "post-title")


def _column(cursor, sql, params=None):
    cursor.execute(sql, params)
    return [row[0] for row in cursor.fetchall()]


def test_front_page_shows_the_newest_posts_and_pages_on(site, blog_db):
    expected = _column(blog_db, "select title from posts" + NEWEST_FIRST)
    assert len(expected) > 5 * PAGE_SIZE
    first = _page(site + "/")
    assert _titles(first) == expected[:PAGE_SIZE]
    assert 'rel="next" href="/?page=2"' in first
    assert _titles(_page(site + "/?page=2")) == expected[PAGE_SIZE : 2 * PAGE_SIZE]
    last_number = (len(expected) - 1) // PAGE_SIZE + 1
    last = _page(site + "/?page=%d" % last_number)
    assert _titles(last) == expected[(last_number - 1) * PAGE_SIZE :]
    assert 'rel="next"' not in last
    assert get(site + "/?page=0")[0] == 404


def test_a_tag_page_lists_only_that_tags_posts(site, blog_db):
    expected = _column(
        blog_db,
        "select title from posts_with_tags where 'web' = any(tags)" + NEWEST_FIRST,
    )
    assert PAGE_SIZE < len(expected) < 2 * PAGE_SIZE
    first = _page(site + "/tag/web")
    second = _page(site + "/tag/web?page=2")
    assert _titles(first) + _titles(second) == expected
    assert 'rel="next" href="/tag/web?page=2"' in first
    assert get(site + "/tag/no-such-tag")[0] == 404


def test_a_post_page_shows_that_post(site, blog_db):
    blog_db.execute("select id, title, body, tags from posts_with_tags where title not like '%, part %'")
    odd_ones = blog_db.fetchall()
    assert len(odd_ones) >= 5
    for post_id, title, body, tags in odd_ones:
        page = _page(site + "/post/%d" % post_id)
        assert _titles(page) == [title]
        assert _text_of(page, "body") == body.split("\n\n")
        assert _text_of(page, "tag") == tags
    assert get(site + "/post/999999")[0] == 404


SEARCHES = ["' or 1=1 --", "%", "_", "\\", '"; drop table posts; --', "<script>", "BACKSLASH"]


@pytest.mark.parametrize("text", SEARCHES)
def test_a_search_with_quotes_and_sql_metacharacters_is_harmless(site, blog_db, text):
    # The oracle finds the text with strpos(), which has no metacharacters at all.
    expected = _column(
        blog_db,
        "select title from posts where strpos(lower(title), lower(%(text)s)) > 0"
        " or strpos(lower(body), lower(%(text)s)) > 0" + NEWEST_FIRST,
        {"text": text},
    )
    total = _column(blog_db, "select count(*) from posts")[0]
    assert 0 < len(expected) <= PAGE_SIZE
    body = _page(site + "/search?" + urllib.parse.urlencode({"q": text}))
    assert _titles(body) == expected
    # Nothing ran but the search: the tables are intact.
    assert _column(blog_db, "select count(*) from posts") == [total]
    assert _column(blog_db, "select count(*) from tags") == [4]


def test_many_concurrent_requests_all_succeed_and_spread_over_the_pool(site, state_dir, blog_db):
    blog_db.execute("select id from posts order by id")
    post_ids = [row[0] for row in blog_db.fetchall()]
    paths = ["/", "/?page=3", "/tag/python", "/tag/notes?page=2", "/search?q=vacuum"]
    paths += ["/post/%d" % post_id for post_id in post_ids[::7]]
    before = _jobs_per_connection(state_dir)

    def client(number):
        return [get(site + paths[(number + i) % len(paths)])[0] for i in range(20)]

    with concurrent.futures.ThreadPoolExecutor(32) as executor:
        statuses = collections.Counter(s for each in executor.map(client, range(32)) for s in each)
    assert statuses == {200: 32 * 20}
    # The daemon's own figures: more than one pooled connection ran the
    # burst's jobs, so the dispatcher spread the app's load over the pool.
    after = _jobs_per_connection(state_dir)
    busy = [number for number, done in after.items() if done > before.get(number, 0)]
    assert len(busy) > 1, "jobs per connection before %s, after %s" % (before, after)
