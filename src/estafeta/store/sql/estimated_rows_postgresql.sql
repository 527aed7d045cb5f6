-- PostgreSQL's estimate of the rows in each of the named indexes (`:names`, an array), as its
-- last VACUUM or ANALYZE of the table left it (autovacuum's, after a tenth or a fifth of the
-- table changed): what the queue's counts say of a state past the rows they count one by one
-- (views.py), instead of walking a million. -1 for an index never vacuumed nor analyzed.
-- PostgreSQL only: SQLite keeps no such figure unless ANALYZE is run by hand.
SELECT c.relname, c.reltuples
FROM pg_class AS c
WHERE c.relname = ANY(:names)
  AND c.relnamespace = current_schema()::regnamespace
