-- Every change of a task's status writes a new entry into each of its indexes
-- (a status change is never a HOT update), so an index that serves no query is
-- pure cost on the live path. tasks_live (org_id, status, id DESC) WHERE live is
-- covered by tasks_org_status (org_id, status, id DESC) since migration 5.
DROP INDEX IF EXISTS tasks_live;
