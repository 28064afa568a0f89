-- The benchmark's table: %(rows)s accounts, one row per id.
-- python -m dbservice.bench loads this file through psycopg2, which binds
-- %(rows)s (--scale); it drops and recreates only this one table.
drop table if exists bench_accounts;

create table bench_accounts (
    id integer primary key,
    balance bigint not null default 0,
    owner text not null
);

insert into bench_accounts (id, balance, owner)
select i, 1000, 'owner ' || i
from generate_series(1, %(rows)s) as i;

analyze bench_accounts;
