-- Issue 11: what a workstation's AI agent answered, and investigations as records.

-- The model that answered a prompt or investigate step and the tokens it reported.
ALTER TABLE steps ADD COLUMN agent_model text, ADD COLUMN input_tokens bigint, ADD COLUMN output_tokens bigint;
-- The worker's own words on how a step ended (`exited with code 3`, `the agent's
-- server answered HTTP 429 …`), at most 2 KiB.
ALTER TABLE steps ADD COLUMN message text;

-- `response`: a prompt step's answer. Evidence answering an investigation's question
-- names the question (its index in the task's questions, and its text).
ALTER TABLE artifacts DROP CONSTRAINT artifacts_kind_check;
ALTER TABLE artifacts ADD CONSTRAINT artifacts_kind_check
    CHECK (kind IN ('note', 'link', 'evidence', 'summary', 'response'));
ALTER TABLE artifacts ADD COLUMN question_index integer, ADD COLUMN question text;
-- One outcome summary per task (Tanjiren's, without a step); an investigate step's
-- closing summary carries its step and is not counted against it.
DROP INDEX artifacts_one_summary;
CREATE UNIQUE INDEX artifacts_one_summary ON artifacts (task_id) WHERE kind = 'summary' AND step_id IS NULL;
-- One answer per question per step: a worker's retried write stores it once.
CREATE UNIQUE INDEX artifacts_one_answer ON artifacts (step_id, question_index) WHERE question_index IS NOT NULL;
-- One response (prompt) or closing summary (investigate) per step; also how the
-- outcome summary finds a step's response.
CREATE UNIQUE INDEX artifacts_step_response ON artifacts (step_id, kind)
    WHERE step_id IS NOT NULL AND kind IN ('response', 'summary');

CREATE TABLE investigations (
    id                uuid PRIMARY KEY,        -- UUIDv7: creation-ordered
    org_id            uuid NOT NULL REFERENCES organisations(id),
    title             text NOT NULL,
    status            text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    opened_by         text NOT NULL,
    opened_at         timestamptz NOT NULL DEFAULT now(),
    -- The investigate task whose creation opened it (none when opened directly).
    opened_by_task_id uuid,
    closed_by         text,
    closed_at         timestamptz,
    close_reason      text
);
-- Listing newest first per organisation, optionally by status.
CREATE INDEX investigations_org_recent ON investigations (org_id, id DESC);

-- Investigation ids used before they were records become records.
INSERT INTO investigations (id, org_id, title, opened_by, opened_at)
SELECT investigation_id, min(org_id::text)::uuid, 'investigation ' || investigation_id, 'migration', min(at)
FROM (
    SELECT investigation_id, org_id, created_at AS at FROM tasks WHERE investigation_id IS NOT NULL
    UNION ALL
    SELECT investigation_id, org_id, created_at FROM artifacts WHERE investigation_id IS NOT NULL
) used
GROUP BY investigation_id;

ALTER TABLE tasks ADD CONSTRAINT tasks_investigation_fk FOREIGN KEY (investigation_id) REFERENCES investigations(id);
ALTER TABLE artifacts ADD CONSTRAINT artifacts_investigation_fk FOREIGN KEY (investigation_id) REFERENCES investigations(id);
