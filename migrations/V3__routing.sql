-- Results of routing: every envelope recipient in state 'queued' is resolved
-- by a router into deliveries that reference the one stored message. A
-- recipient becomes 'routed' (or 'failed' when nothing could be delivered)
-- in the same transaction that inserts its deliveries.

ALTER TABLE recipients
    ADD COLUMN resolution text,
    ADD CONSTRAINT recipients_state CHECK (state IN ('queued', 'routed', 'failed'));

-- Deliveries of one message to one destination, at most N recipients each.
CREATE TABLE delivery_batches (
    id          bigserial   PRIMARY KEY,
    message_id  uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    -- 'maildir:PATH', 'lmtp:TARGET', 'domain:NAME' or 'group:NAME'. Grouping
    -- by MX host set can later use 'mx:…' destinations.
    destination text        NOT NULL,
    -- Reverse-path for the whole batch ('' for <>): list mail goes out with
    -- the list owner as sender, so its recipients form batches of their own.
    sender      text        NOT NULL,
    recipients  integer     NOT NULL CHECK (recipients > 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_batches_message_idx ON delivery_batches (message_id);

CREATE TABLE deliveries (
    id              bigserial   PRIMARY KEY,
    message_id      uuid        NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    batch_id        bigint      NOT NULL REFERENCES delivery_batches (id) ON DELETE CASCADE,
    -- The envelope recipient this delivery came from.
    recipient_id    bigint      NOT NULL REFERENCES recipients (id) ON DELETE CASCADE,
    -- Address the delivery goes to: a mailbox owner's address or a remote address.
    address         text        NOT NULL,
    kind            text        NOT NULL CHECK (kind IN ('mailbox', 'remote', 'relay')),
    destination     text        NOT NULL,
    -- Header fields written before the stored body, such as Delivered-To.
    header_prefix   bytea       NOT NULL DEFAULT '',
    -- How the address was reached, e.g. 'list staff@example.com > account alice'.
    trace           text        NOT NULL,
    orcpt           text,
    notify          text,
    state           text        NOT NULL DEFAULT 'pending'
                                CHECK (state IN ('pending', 'delivered', 'failed', 'expired')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_reply      text,
    lease_owner     text,
    lease_until     timestamptz,
    lease_token     bigint      NOT NULL DEFAULT 0,
    CONSTRAINT deliveries_lease_pair CHECK ((lease_owner IS NULL) = (lease_until IS NULL))
);
CREATE INDEX deliveries_due_idx ON deliveries (destination, next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_message_idx ON deliveries (message_id);

-- Routing claims: queued recipients, oldest message first.
CREATE INDEX recipients_queued_idx ON recipients (message_id, id) WHERE state = 'queued';
