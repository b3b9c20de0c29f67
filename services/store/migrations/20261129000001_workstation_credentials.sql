-- Workstation credentials (DESIGN §3): a worker enrols with an organisation token
-- and receives a credential bound to its workstation. It is an api_tokens row with
-- role `worker` and `workstation_id` set, stored hashed and revocable like any
-- token; lease and ingest requests are accepted only with such a credential, and
-- only for steps of that workstation.
ALTER TABLE api_tokens ADD COLUMN workstation_id uuid REFERENCES workstations(id);
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_workstation_role
    CHECK (workstation_id IS NULL OR role = 'worker');
CREATE INDEX api_tokens_workstation ON api_tokens (workstation_id) WHERE workstation_id IS NOT NULL;

-- A finished step holds no lease: a stored result now ends it in the same
-- transaction (generation + 1, no owner). Steps finished before this rule whose
-- release was lost are ended here.
UPDATE steps SET lease_generation = lease_generation + 1, lease_owner = NULL, lease_expires_at = NULL
WHERE status IN ('succeeded', 'failed', 'cancelled') AND lease_owner IS NOT NULL;
