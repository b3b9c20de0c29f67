-- no-transaction
-- Issue 14: `tasks_root` held one entry per task version although a first attempt
-- is its own root (root_task_id = id): only retries (attempt > 1) need the index;
-- queries for a chain ask for `id = $root OR (root_task_id = $root AND attempt > 1)`.
-- Built CONCURRENTLY (no write lock on `tasks` while it builds); on its own in a
-- file without a transaction, as CONCURRENTLY requires. An interrupted build leaves
-- an invalid index, which `tanjiren_store::db::migrate` drops before it migrates,
-- so the retry builds it again. `tasks_root` stays one release: services of the
-- previous release still read chains by `root_task_id = $1` alone.
CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_root_retries ON tasks (root_task_id) WHERE attempt > 1;
