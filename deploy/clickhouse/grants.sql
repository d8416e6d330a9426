-- Tessera's ClickHouse users with SQL access control (current releases;
-- Debian's 18.16 has none: use users.xml there). Run as a user with
-- access_management, e.g.
--     clickhouse-client --multiquery < grants.sql
-- after replacing every 'REPLACE-ME' with a generated password. Never commit
-- the filled-in copy. Re-running it is harmless (IF NOT EXISTS throughout).

CREATE DATABASE IF NOT EXISTS tessera;

-- Settlement creates its tables at start, inserts settled events and
-- rollups, reads them back, and looks for its own running queries.
CREATE USER IF NOT EXISTS tessera_settlement
    IDENTIFIED WITH sha256_password BY 'REPLACE-ME'
    HOST LOCAL, IP '10.0.0.0/8';
GRANT CREATE DATABASE, CREATE TABLE, INSERT, SELECT ON tessera.* TO tessera_settlement;
GRANT SELECT ON system.processes TO tessera_settlement;

-- Dashboards and operators: read the ledger, change nothing.
CREATE USER IF NOT EXISTS tessera_reader
    IDENTIFIED WITH sha256_password BY 'REPLACE-ME'
    SETTINGS readonly = 1;
GRANT SELECT ON tessera.* TO tessera_reader;

-- Enterprise customers: each reads its own rows of the per-customer tables
-- and nothing else. A row policy on a table hides every row from users it
-- does not name, so the staff policies keep all rows visible to everyone
-- but customers.
CREATE ROLE IF NOT EXISTS tessera_customer;
CREATE ROW POLICY IF NOT EXISTS tessera_staff ON tessera.usage_events USING 1 TO ALL EXCEPT tessera_customer;
CREATE ROW POLICY IF NOT EXISTS tessera_staff ON tessera.usage_hourly_customer USING 1 TO ALL EXCEPT tessera_customer;

-- One customer, "acme"; repeat per customer with its id.
CREATE USER IF NOT EXISTS tessera_customer_acme
    IDENTIFIED WITH sha256_password BY 'REPLACE-ME'
    SETTINGS readonly = 1;
GRANT tessera_customer TO tessera_customer_acme;
SET DEFAULT ROLE tessera_customer TO tessera_customer_acme;
GRANT SELECT ON tessera.usage_events TO tessera_customer_acme;
GRANT SELECT ON tessera.usage_hourly_customer TO tessera_customer_acme;
CREATE ROW POLICY IF NOT EXISTS customer_acme ON tessera.usage_events USING customer = 'acme' TO tessera_customer_acme;
CREATE ROW POLICY IF NOT EXISTS customer_acme ON tessera.usage_hourly_customer USING customer = 'acme' TO tessera_customer_acme;
