-- Approval gates (DESIGN §4): versioned doctrine, each task's approval snapshot,
-- single-use approval tokens, and every decision. The approval service owns
-- `doctrines`, `approval_tokens`, `approvals` and the snapshot columns of `tasks`;
-- ingest writes `tasks.created_by_token_id`.

-- The creating identity: decisions compare token ids, never names.
ALTER TABLE tasks ADD COLUMN created_by_token_id uuid;

-- Doctrine's verdict, taken once when the task is evaluated and never re-evaluated.
ALTER TABLE tasks ADD COLUMN doctrine_version integer;                  -- NULL: the organisation had no doctrine
ALTER TABLE tasks ADD COLUMN approval_class text
    CHECK (approval_class IN ('none', 'sensitive_write', 'production_mutation'));
ALTER TABLE tasks ADD COLUMN approval_rules jsonb;                      -- [{name, class, require_reason}] that matched
ALTER TABLE tasks ADD COLUMN approval_reason_required boolean NOT NULL DEFAULT false;
ALTER TABLE tasks ADD COLUMN payload_digest text;                       -- sha256 of intent, mode + payload, targets
ALTER TABLE tasks ADD COLUMN approval_requested_at timestamptz;
ALTER TABLE tasks ADD COLUMN approval_deadline timestamptz;

-- Pending tasks: the approvers' list per organisation, and the expiry sweep by deadline.
CREATE INDEX tasks_approval_pending ON tasks (org_id, approval_deadline)
    WHERE status = 'planned' AND approval_status = 'pending';
CREATE INDEX tasks_approval_deadline ON tasks (approval_deadline)
    WHERE status = 'planned' AND approval_status = 'pending';

-- What a task does cannot change once it exists, and its snapshot cannot change once
-- taken: an approval token approves exactly the payload it was minted for.
CREATE FUNCTION tasks_keep_payload_and_snapshot() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.intent IS DISTINCT FROM OLD.intent
       OR NEW.mode IS DISTINCT FROM OLD.mode
       OR NEW.payload IS DISTINCT FROM OLD.payload
       OR NEW.targets IS DISTINCT FROM OLD.targets
       OR NEW.created_by_token_id IS DISTINCT FROM OLD.created_by_token_id THEN
        RAISE EXCEPTION 'task %: intent, mode, payload, targets and creator cannot change after planning', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.approval_class IS NOT NULL AND (
           NEW.approval_class IS DISTINCT FROM OLD.approval_class
           OR NEW.doctrine_version IS DISTINCT FROM OLD.doctrine_version
           OR NEW.approval_rules IS DISTINCT FROM OLD.approval_rules
           OR NEW.approval_reason_required IS DISTINCT FROM OLD.approval_reason_required
           OR NEW.payload_digest IS DISTINCT FROM OLD.payload_digest
           OR NEW.approval_deadline IS DISTINCT FROM OLD.approval_deadline) THEN
        RAISE EXCEPTION 'task %: the approval snapshot cannot change once taken', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER tasks_keep_payload_and_snapshot
    BEFORE UPDATE OF intent, mode, payload, targets, created_by_token_id, doctrine_version, approval_class,
                     approval_rules, approval_reason_required, payload_digest, approval_deadline
    ON tasks FOR EACH ROW EXECUTE FUNCTION tasks_keep_payload_and_snapshot();

-- Doctrine versions, per organisation, append-only; the highest version is in force.
CREATE TABLE doctrines (
    org_id                 uuid NOT NULL REFERENCES organisations(id),
    version                integer NOT NULL CHECK (version >= 1),
    document               jsonb NOT NULL,
    published_by           text NOT NULL,
    published_by_token_id  uuid NOT NULL,
    published_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, version)
);

CREATE FUNCTION doctrines_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'doctrine versions cannot be changed or deleted; publish a new version'
        USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER doctrines_are_append_only BEFORE UPDATE OR DELETE ON doctrines
    FOR EACH ROW EXECUTE FUNCTION doctrines_are_append_only();

-- Approval tokens: only the SHA-256 of the token is stored; each is bound to one task,
-- its class and its payload digest, and is consumed at most once.
CREATE TABLE approval_tokens (
    id                    uuid PRIMARY KEY,
    org_id                uuid NOT NULL REFERENCES organisations(id),
    task_id               uuid NOT NULL REFERENCES tasks(id),
    approval_class        text NOT NULL CHECK (approval_class IN ('sensitive_write', 'production_mutation')),
    payload_digest        text NOT NULL,
    token_hash            text NOT NULL UNIQUE,
    minted_by_token_id    uuid NOT NULL REFERENCES api_tokens(id),
    minted_by             text NOT NULL,
    minted_by_role        text NOT NULL CHECK (minted_by_role IN ('admin', 'owner')),
    created_at            timestamptz NOT NULL,
    expires_at            timestamptz NOT NULL CHECK (expires_at > created_at),
    consumed_at           timestamptz,
    consumed_by_token_id  uuid
);
CREATE INDEX approval_tokens_task ON approval_tokens (task_id);

-- Every decision: approved or rejected (with the token that carried it), or expired.
-- One per task, and a token decides at most once.
CREATE TABLE approvals (
    id                     uuid PRIMARY KEY,                -- UUIDv7: decision-ordered
    org_id                 uuid NOT NULL REFERENCES organisations(id),
    task_id                uuid NOT NULL UNIQUE REFERENCES tasks(id),
    decision               text NOT NULL CHECK (decision IN ('approved', 'rejected', 'expired')),
    approval_class         text NOT NULL CHECK (approval_class IN ('sensitive_write', 'production_mutation')),
    decided_by             text NOT NULL,                   -- the minter's token name; 'system' for an expiry
    decided_by_token_id    uuid,
    decided_by_role        text CHECK (decided_by_role IN ('admin', 'owner')),
    presented_by           text,
    presented_by_token_id  uuid,
    approval_token_id      uuid UNIQUE REFERENCES approval_tokens(id),
    reason                 text,
    decided_at             timestamptz NOT NULL,
    CHECK (decision = 'expired' OR (approval_token_id IS NOT NULL AND decided_by_token_id IS NOT NULL))
);
CREATE INDEX approvals_org_recent ON approvals (org_id, id DESC);
