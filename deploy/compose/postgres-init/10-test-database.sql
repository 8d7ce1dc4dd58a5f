-- Runs once, when the compose Postgres volume is first initialised (POSTGRES_DB creates `relay`).
-- The test suite connects to database `test` as user postgres and creates its own databases.
CREATE DATABASE test;
