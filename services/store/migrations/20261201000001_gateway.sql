-- The runtime overview (tasks.overview, the gateway's runtime-overview resource):
-- worker requests refused with stale_lease, per organisation and hour.
CREATE TABLE stale_lease_rejections (
    org_id uuid NOT NULL,
    hour   timestamptz NOT NULL,
    count  bigint NOT NULL,
    PRIMARY KEY (org_id, hour)
);

