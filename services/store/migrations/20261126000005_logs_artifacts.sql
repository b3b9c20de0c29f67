-- Logs deduplicated by signature, the per-step log cap, artifacts reachable from
-- every attempt of a task, one outcome summary per task, and the read-side indexes.

-- Raw lines stay in task_logs (the raw view needs them); each also records its
-- signature hash so "every occurrence of this signature" is one index scan.
ALTER TABLE task_logs ADD COLUMN sig_hash bigint;

-- One row per (step, signature): how often it occurred, where first and last,
-- and the first line that produced it (the exemplar). Updated in the same
-- statement (and transaction) that stores the lines.
CREATE TABLE task_log_signatures (
    step_id     uuid NOT NULL,
    sig_hash    bigint NOT NULL,              -- first 8 bytes of SHA-256 of the signature
    task_id     uuid NOT NULL,
    stream      text NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    signature   text NOT NULL,                -- the normalised line (first 512 chars)
    exemplar    text NOT NULL,                -- the first line with this signature, as stored
    count       bigint NOT NULL,
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL,
    first_at    timestamptz NOT NULL,
    last_at     timestamptz NOT NULL,
    PRIMARY KEY (step_id, sig_hash)
);
CREATE INDEX task_log_signatures_task ON task_log_signatures (task_id, step_id, first_seq);

-- Bytes of output stored per step (the cap) and whether the cap was hit.
ALTER TABLE steps ADD COLUMN log_bytes bigint NOT NULL DEFAULT 0;
ALTER TABLE steps ADD COLUMN log_truncated boolean NOT NULL DEFAULT false;

-- Artifacts: the attempt chain they belong to, the step that wrote them, their size.
ALTER TABLE artifacts ADD COLUMN root_task_id uuid;
ALTER TABLE artifacts ADD COLUMN step_id uuid;
ALTER TABLE artifacts ADD COLUMN size_bytes integer NOT NULL DEFAULT 0;
UPDATE artifacts a SET root_task_id = t.root_task_id FROM tasks t WHERE t.id = a.task_id;
CREATE INDEX artifacts_root ON artifacts (root_task_id, id) WHERE root_task_id IS NOT NULL;
CREATE INDEX artifacts_org_investigation ON artifacts (org_id, investigation_id, id) WHERE investigation_id IS NOT NULL;
-- Exactly one outcome summary per task, whichever ingest replica writes it first.
CREATE UNIQUE INDEX artifacts_one_summary ON artifacts (task_id) WHERE kind = 'summary';

-- Read side: lists stay index scans on (org_id, …, id DESC) with millions of rows.
CREATE INDEX tasks_org_status ON tasks (org_id, status, id DESC);
CREATE INDEX tasks_org_mode ON tasks (org_id, mode, id DESC);
CREATE INDEX tasks_org_investigation ON tasks (org_id, investigation_id, id DESC) WHERE investigation_id IS NOT NULL;
CREATE INDEX tasks_targets ON tasks USING gin (targets);
-- Terminal tasks by end time: the summary sweep looks at recent ones only.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE status IN ('completed', 'failed', 'cancelled');
