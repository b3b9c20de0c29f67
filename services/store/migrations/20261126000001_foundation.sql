-- Tanjiren foundation schema. Each table has one owning service (DESIGN §1, §6).
-- Live-state partial indexes keep the hot path independent of history size.

CREATE TABLE organisations (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- API tokens: only the SHA-256 of the token is stored; each is scoped to one organisation.
CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    org_id      uuid NOT NULL REFERENCES organisations(id),
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('worker', 'member', 'admin', 'owner')),
    token_hash  text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE workstations (
    id            uuid PRIMARY KEY,
    org_id        uuid NOT NULL REFERENCES organisations(id),
    name          text NOT NULL,
    labels        jsonb NOT NULL DEFAULT '{}'::jsonb,
    registered_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz,
    UNIQUE (org_id, name)
);

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,            -- UUIDv7: creation-ordered
    org_id           uuid NOT NULL REFERENCES organisations(id),
    intent           text NOT NULL,
    mode             text NOT NULL CHECK (mode IN ('command', 'prompt', 'investigate')),
    payload          jsonb NOT NULL,              -- the mode's payload: {command} | {prompt} | {questions}
    targets          uuid[] NOT NULL,
    status           text NOT NULL CHECK (status IN ('planned', 'queued', 'executing', 'completed', 'failed', 'cancelled')),
    approval_status  text NOT NULL CHECK (approval_status IN ('unevaluated', 'not_required', 'pending', 'approved', 'rejected', 'expired')),
    failure_reason   text,
    timeout_secs     bigint NOT NULL,
    retry_policy     jsonb,
    investigation_id uuid,
    idempotency_key  text,
    retry_of_task_id uuid REFERENCES tasks(id),
    root_task_id     uuid NOT NULL,
    attempt          integer NOT NULL DEFAULT 1,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    queued_at        timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz
);
-- One task per (organisation, idempotency key), for as long as the task is kept (≥ 24 h).
CREATE UNIQUE INDEX tasks_idempotency ON tasks (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Listing newest first per organisation (ids are time-ordered).
CREATE INDEX tasks_org_recent ON tasks (org_id, id DESC);
-- Live tasks by state: the operators' "what is running" view.
CREATE INDEX tasks_live ON tasks (org_id, status, id DESC) WHERE status IN ('planned', 'queued', 'executing');
-- Planned tasks whose doctrine has not been evaluated: the approval service's sweep.
CREATE INDEX tasks_unevaluated ON tasks (created_at) WHERE status = 'planned' AND approval_status = 'unevaluated';
CREATE INDEX tasks_root ON tasks (root_task_id);

CREATE TABLE executions (
    id          uuid PRIMARY KEY,
    task_id     uuid NOT NULL UNIQUE REFERENCES tasks(id),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One step per target workstation; the unit a lease covers. lease_generation is the fencing token.
CREATE TABLE steps (
    id                uuid PRIMARY KEY,
    execution_id      uuid NOT NULL REFERENCES executions(id),
    task_id           uuid NOT NULL REFERENCES tasks(id),
    org_id            uuid NOT NULL,
    workstation_id    uuid NOT NULL REFERENCES workstations(id),
    status            text NOT NULL CHECK (status IN ('queued', 'executing', 'succeeded', 'failed', 'cancelled')),
    lease_generation  bigint NOT NULL DEFAULT 0,
    lease_owner       text,
    lease_expires_at  timestamptz,
    claimed_at        timestamptz,
    last_heartbeat_at timestamptz,
    dispatched_at     timestamptz,
    exit_code         integer,
    failure_reason    text,
    started_at        timestamptz,
    finished_at       timestamptz,
    stdout_tail       text NOT NULL DEFAULT '',
    stderr_tail       text NOT NULL DEFAULT ''
);
CREATE INDEX steps_task ON steps (task_id);
-- Queued steps per workstation: heartbeat piggyback offers.
CREATE INDEX steps_queued_by_workstation ON steps (workstation_id, id) WHERE status = 'queued';
-- Queued steps by last dispatch: the scheduler's re-send.
CREATE INDEX steps_queued_by_dispatch ON steps (dispatched_at) WHERE status = 'queued';
-- Executing steps by claim time: the reconciler.
CREATE INDEX steps_executing ON steps (claimed_at) WHERE status = 'executing';

-- Output lines, per step in sequence order. (step_id, seq) makes a retried batch idempotent.
CREATE TABLE task_logs (
    step_id  uuid NOT NULL,
    seq      bigint NOT NULL,
    task_id  uuid NOT NULL,
    stream   text NOT NULL CHECK (stream IN ('stdout', 'stderr')),
    line     text NOT NULL,
    at       timestamptz NOT NULL,
    PRIMARY KEY (step_id, seq)
);
CREATE INDEX task_logs_task ON task_logs (task_id, step_id, seq);

-- Durable findings; they outlive the task.
CREATE TABLE artifacts (
    id               uuid PRIMARY KEY,
    org_id           uuid NOT NULL REFERENCES organisations(id),
    task_id          uuid REFERENCES tasks(id),
    investigation_id uuid,
    kind             text NOT NULL CHECK (kind IN ('note', 'link', 'evidence', 'summary')),
    title            text NOT NULL DEFAULT '',
    body             text NOT NULL DEFAULT '',
    url              text,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (task_id IS NOT NULL OR investigation_id IS NOT NULL)
);
CREATE INDEX artifacts_task ON artifacts (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX artifacts_investigation ON artifacts (investigation_id) WHERE investigation_id IS NOT NULL;
