-- Schedules and retries (DESIGN §2, §6; docs/protocol.md §13-14). The scheduler owns
-- `task_schedules` and `schedule_ticks`, and writes `tasks.retry_at` (cleared when the
-- next attempt is created); tasks themselves are still inserted by ingest's creation code.

CREATE TABLE task_schedules (
    id                   uuid PRIMARY KEY,                -- UUIDv7: creation-ordered
    org_id               uuid NOT NULL REFERENCES organisations(id),
    name                 text NOT NULL,
    cron                 text NOT NULL,                   -- as given
    cron_normalized      text NOT NULL,                   -- what the scheduler evaluates
    timezone             text NOT NULL,                   -- IANA name
    template             jsonb NOT NULL,                  -- TaskTemplate
    enabled              boolean NOT NULL DEFAULT true,
    overlap              text NOT NULL DEFAULT 'skip' CHECK (overlap IN ('skip', 'allow')),
    catch_up_ticks       integer NOT NULL DEFAULT 1 CHECK (catch_up_ticks BETWEEN 1 AND 100),
    next_run_at          timestamptz,                     -- NULL: never fires again
    last_tick_at         timestamptz,
    last_task_id         uuid,
    created_by           text NOT NULL,
    created_by_token_id  uuid NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    deleted_at           timestamptz
);
-- Names are unique among the schedules that are not deleted.
CREATE UNIQUE INDEX task_schedules_name ON task_schedules (org_id, name) WHERE deleted_at IS NULL;
-- The scheduler's hot query: enabled schedules by next run (paused and deleted ones are not in it).
CREATE INDEX task_schedules_due ON task_schedules (next_run_at) WHERE enabled;
CREATE INDEX task_schedules_org_recent ON task_schedules (org_id, id DESC) WHERE deleted_at IS NULL;

-- The ledger: one row per tick of a schedule, whatever became of it.
CREATE TABLE schedule_ticks (
    schedule_id  uuid NOT NULL REFERENCES task_schedules(id),
    tick_at      timestamptz NOT NULL,
    org_id       uuid NOT NULL,
    outcome      text NOT NULL CHECK (outcome IN ('fired', 'skipped_overlap', 'missed', 'failed')),
    task_id      uuid,
    reason       text,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, tick_at),                   -- a tick is recorded once, even if replayed
    CHECK (outcome <> 'fired' OR task_id IS NOT NULL)
);

-- Retries: a failed task whose policy allows another attempt gets `retry_at` in the
-- transaction that fails it; the scheduler creates the next attempt once it has passed.
ALTER TABLE tasks ADD COLUMN retry_at timestamptz;
CREATE INDEX tasks_retry_due ON tasks (retry_at) WHERE retry_at IS NOT NULL;

-- The schedule a task was created for (its retries inherit it).
ALTER TABLE tasks ADD COLUMN schedule_id uuid REFERENCES task_schedules(id);
-- Live tasks per schedule, and failed ones still waiting for their retry: the overlap check.
CREATE INDEX tasks_schedule_live ON tasks (schedule_id)
    WHERE schedule_id IS NOT NULL AND (status IN ('planned', 'queued', 'executing') OR retry_at IS NOT NULL);
CREATE INDEX tasks_schedule ON tasks (schedule_id, id DESC) WHERE schedule_id IS NOT NULL;

