"""The blog's queries. Every value goes in as a bound parameter."""

import collections

PAGE_SIZE = 10

#: One page of a listing: its posts, its number from 1, and whether more follow.
Page = collections.namedtuple("Page", "posts number has_next")

_NEWEST_FIRST = " order by published_at desc, id desc limit %(limit)s offset %(offset)s"

_RECENT = "select id, title, published_at, tags from posts_with_tags" + _NEWEST_FIRST

_TAGGED = (
    "select id, title, published_at, tags from posts_with_tags"
    " where id in (select pt.post_id from post_tags pt join tags t on t.id = pt.tag_id"
    " where t.name = %(tag)s)" + _NEWEST_FIRST
)

# E'\\' is one backslash whatever standard_conforming_strings says.
_SEARCH = (
    "select id, title, published_at, tags from posts_with_tags"
    r" where title ilike %(pattern)s escape E'\\' or body ilike %(pattern)s escape E'\\'" + _NEWEST_FIRST
)

_POST = "select id, title, body, published_at, tags from posts_with_tags where id = %(id)s"


def recent(db, page):
    """Page *page* of all posts, newest first."""
    return _page(db, _RECENT, {}, page)


def tagged(db, tag, page):
    """Page *page* of the posts tagged *tag*, newest first."""
    return _page(db, _TAGGED, {"tag": tag}, page)


def search(db, text, page):
    """Page *page* of the posts whose title or body contains *text*, ignoring case."""
    return _page(db, _SEARCH, {"pattern": like_pattern(text)}, page)


def get(db, post_id):
    """The post *post_id* as a dict, or None."""
    posts = _records(db.fetchtable(_POST, {"id": post_id}))
    return posts[0] if posts else None


def like_pattern(text):
    r"""A LIKE pattern (with ESCAPE '\') that finds *text* anywhere, literally.

    Without escaping, a search for ``%`` or ``_`` would match every post.
    """
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return "%" + escaped + "%"


def _page(db, sql, params, number):
    # One row more than a page tells whether there is a next page.
    params = dict(params, limit=PAGE_SIZE + 1, offset=(number - 1) * PAGE_SIZE)
    posts = _records(db.fetchtable(sql, params))
    return Page(posts[:PAGE_SIZE], number, len(posts) > PAGE_SIZE)


def _records(table):
    columns, rows = table
    return [dict(zip(columns, row)) for row in rows]
