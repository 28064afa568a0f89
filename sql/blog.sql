-- The example blog's schema and sample data (examples/blog).
-- Loading it again starts the blog afresh: it drops what it creates.

drop view if exists posts_with_tags;
drop table if exists post_tags, tags, posts;

create table posts (
    id serial primary key,
    title text not null,
    body text not null,
    published_at timestamptz not null
);

create index posts_newest_first on posts (published_at desc, id desc);

create table tags (
    id serial primary key,
    name text not null unique
);

create table post_tags (
    post_id integer not null references posts on delete cascade,
    tag_id integer not null references tags on delete cascade,
    primary key (post_id, tag_id)
);

create index post_tags_by_tag on post_tags (tag_id);

-- What every page lists: a post with its tag names, in name order.
create view posts_with_tags as
select p.id, p.title, p.body, p.published_at,
       array(select t.name
             from post_tags pt join tags t on t.id = pt.tag_id
             where pt.post_id = p.id
             order by t.name) as tags
from posts p;

-- Enough posts for several pages. Their text holds no quotes and no LIKE
-- metacharacters, so a search for one finds only the posts below that have it.
insert into posts (title, body, published_at)
select (array['Pooling', 'Indexes', 'Vacuum', 'Replication', 'Locks', 'Backups'])[1 + n % 6]
           || ', part ' || n,
       'Part ' || n || ' of a series on running PostgreSQL behind a web app.'
           || chr(10) || chr(10)
           || 'Every page of this blog is a handful of queries through one dbservice daemon.',
       timestamptz '2024-01-01 09:00+00' + make_interval(days => n)
from generate_series(1, 60) as n;

-- Titles with quotes, SQL and LIKE metacharacters, HTML and non-ASCII text,
-- spread over the pages by date.
insert into posts (title, body, published_at) values
    (E'It''s "quoted" twice',
     E'Single quotes, double quotes: the driver binds them, nobody escapes them by hand.',
     '2024-02-28 12:00+00'),
    (E'100% of 1_000 connections, pooled',
     E'A percent sign and an underscore mean something to LIKE; here they are only text.',
     '2024-02-14 12:00+00'),
    (E'C:\\Program Files\\PostgreSQL, a backslash story',
     E'Backslashes escape LIKE patterns, so a search for one must escape it too.',
     '2024-01-31 12:00+00'),
    (E'Why '' or 1=1 -- is not a password',
     E'Bound parameters are values, never SQL.',
     '2024-01-20 12:00+00'),
    (E'Little Bobby said "; drop table posts; --',
     E'And the posts table is still here.',
     '2024-01-10 12:00+00'),
    (E'<script>alert("hi")</script> & other HTML',
     E'Templates escape what they show: <b>this</b> is not bold.',
     '2024-02-05 12:00+00'),
    (E'Ünïcödé, naïve café — and an elephant 🐘',
     E'Text is text, in any script.',
     '2024-02-20 12:00+00');

insert into tags (name) values ('postgresql'), ('python'), ('web'), ('notes');

-- postgresql on every 2nd post, python on every 3rd, web every 4th, notes every 5th.
insert into post_tags (post_id, tag_id)
select p.id, t.id
from posts p cross join tags t
where p.id % (t.id + 1) = 0;
