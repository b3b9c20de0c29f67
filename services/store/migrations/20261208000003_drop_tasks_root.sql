-- no-transaction
-- Issue 14: replaced by tasks_root_retries (previous migration). Dropped
-- CONCURRENTLY: it waits for the transactions using it and never blocks writes.
DROP INDEX CONCURRENTLY IF EXISTS tasks_root;
