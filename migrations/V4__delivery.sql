-- Delivery: per-destination scheduling state, per-delivery attempt history,
-- and operator holds.

-- A held message is not delivered until an operator releases it.
ALTER TABLE messages ADD COLUMN held boolean NOT NULL DEFAULT false;

-- One row per destination named in deliveries ('domain:…', 'group:…',
-- 'maildir:…', 'lmtp:…'). Routers insert the row when they write the first
-- delivery to a destination; delivery workers read it to find due work and
-- write the backoff after a failed connection. A periodic scan re-creates
-- rows for pending deliveries that lack one, so deleting an idle row is safe.
CREATE TABLE destinations (
    name            text        PRIMARY KEY,
    -- No connection is attempted before this time.
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Consecutive attempts that ended before any recipient got an answer
    -- (no route, connection refused, greeting refused, TLS required but
    -- unavailable). Zero after any attempt that reached a recipient.
    failures        integer     NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error      text,
    -- Set by `wsmtp queue hold --destination`; cleared by release.
    held            boolean     NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX destinations_due_idx ON destinations (next_attempt_at) WHERE NOT held;

ALTER TABLE deliveries
    ADD COLUMN last_attempt_at timestamptz,
    -- Host that gave last_reply, for the DSN's Remote-MTA field.
    ADD COLUMN remote_mta      text,
    -- How many of the configured delay-notice ages were already reported.
    ADD COLUMN delay_notices   integer NOT NULL DEFAULT 0 CHECK (delay_notices >= 0);

-- A lease also moves next_attempt_at to the lease's end, so "due" is one
-- range condition on the due index: unleased work that is due, or leases
-- that expired.
COMMENT ON COLUMN deliveries.next_attempt_at IS
    'Earliest time a worker may claim the delivery: the retry time, or the end of the current lease';

-- Deliveries written before this migration get their destination rows.
INSERT INTO destinations (name)
SELECT DISTINCT destination FROM deliveries WHERE state = 'pending'
ON CONFLICT DO NOTHING;
