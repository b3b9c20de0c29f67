-- Leases that cannot be fooled: cancellation, queue timeouts, reconciler visibility.

-- Cancellation: when it was asked for, and when the worker confirmed the stop.
ALTER TABLE steps ADD COLUMN cancel_requested_at timestamptz;
ALTER TABLE steps ADD COLUMN stop_confirmed_at timestamptz;
ALTER TABLE tasks ADD COLUMN cancel_reason text;
ALTER TABLE tasks ADD COLUMN cancelled_by text;

-- Queue timeouts: a queued step not claimed by this deadline fails with `queue_timeout`.
ALTER TABLE tasks ADD COLUMN queue_timeout_secs bigint NOT NULL DEFAULT 3600;
ALTER TABLE steps ADD COLUMN queue_deadline timestamptz NOT NULL DEFAULT 'infinity';
CREATE INDEX steps_queue_deadline ON steps (queue_deadline) WHERE status = 'queued';

-- The reconciler looks only at executing steps whose lease has expired in Postgres.
CREATE INDEX steps_lease_expiry ON steps (lease_expires_at) WHERE status = 'executing';
