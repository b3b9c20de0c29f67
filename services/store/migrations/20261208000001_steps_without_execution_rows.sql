-- Issue 14: an execution is the set of a task's steps that share steps.execution_id;
-- its row in `executions` (id, task_id, created_at) held nothing else, and cost an
-- insert, two index entries and two foreign-key checks per task. New code no longer
-- writes it; the constraint goes now (a brief lock of `steps`, no scan), and the
-- table stays one release so that services of the previous release, which still
-- insert into it, can run side by side with this one. It is dropped in the next.
SET LOCAL lock_timeout = '1s';
ALTER TABLE steps DROP CONSTRAINT IF EXISTS steps_execution_id_fkey;
