-- Account directory: domains, accounts with their addresses and delivery
-- methods, and distribution lists. Listeners load it into memory and reload
-- when the version in directory_version changes (a NOTIFY on the channel
-- wsmtp_directory says so at once; polling is the backstop).
--
-- Addresses are stored normalised: lowercase local part, '@', lowercase
-- A-label domain. '@example.com' (empty local part) is the domain's
-- catch-all entry.

CREATE TABLE directory_domains (
    name         text PRIMARY KEY CHECK (name <> '' AND name = lower(name)),
    -- local: only addresses in this directory exist.
    -- relay: every address passes through to legacy_group.
    -- migrating: addresses in this directory are local, every other address
    --            passes through to legacy_group.
    kind         text NOT NULL CHECK (kind IN ('local', 'relay', 'migrating')),
    legacy_group text,
    CONSTRAINT directory_domains_group CHECK ((kind = 'local') = (legacy_group IS NULL))
);

CREATE TABLE accounts (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL UNIQUE CHECK (name <> ''),
    -- Mailbox: a Maildir path, or an LMTP target ('host:port' or a socket path).
    mailbox_kind   text CHECK (mailbox_kind IN ('maildir', 'lmtp')),
    mailbox_target text,
    -- Relay target: every message for the account also goes to this group.
    relay_group    text,
    -- Argon2 hash for SMTP AUTH; null: the account cannot authenticate.
    password_hash  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT accounts_mailbox_pair CHECK ((mailbox_kind IS NULL) = (mailbox_target IS NULL))
);

CREATE TABLE lists (
    id    bigserial PRIMARY KEY,
    name  text NOT NULL UNIQUE CHECK (name <> ''),
    -- Reverse-path of mail expanded from the list (RFC 5321 section 3.9).
    owner text NOT NULL
);

CREATE TABLE addresses (
    address    text PRIMARY KEY CHECK (address = lower(address) AND position('@' IN address) > 0),
    domain     text NOT NULL REFERENCES directory_domains (name) ON DELETE CASCADE,
    account_id bigint REFERENCES accounts (id) ON DELETE CASCADE,
    list_id    bigint REFERENCES lists (id) ON DELETE CASCADE,
    CONSTRAINT addresses_one_owner CHECK ((account_id IS NULL) <> (list_id IS NULL))
);
CREATE INDEX addresses_account_idx ON addresses (account_id);
CREATE INDEX addresses_list_idx ON addresses (list_id);

CREATE TABLE forwards (
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    target     text   NOT NULL CHECK (position('@' IN target) > 0),
    PRIMARY KEY (account_id, target)
);

CREATE TABLE list_members (
    list_id bigint NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    member  text   NOT NULL CHECK (position('@' IN member) > 0),
    PRIMARY KEY (list_id, member)
);

CREATE TABLE auto_replies (
    account_id       bigint PRIMARY KEY REFERENCES accounts (id) ON DELETE CASCADE,
    -- echo: returns the message to its sender; vacation: at most once per
    -- interval per correspondent; every_time: each message, rate-limited.
    kind             text    NOT NULL CHECK (kind IN ('echo', 'vacation', 'every_time')),
    subject          text    NOT NULL,
    body             text    NOT NULL,
    active_from      timestamptz,
    active_until     timestamptz,
    interval_seconds bigint  NOT NULL DEFAULT 604800 CHECK (interval_seconds > 0),
    enabled          boolean NOT NULL DEFAULT true
);

-- Auto-reply state per correspondent: when the last reply went out, and for
-- rate limiting how many went out in the current window.
CREATE TABLE auto_reply_log (
    account_id    bigint      NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    correspondent text        NOT NULL,
    last_sent_at  timestamptz NOT NULL,
    window_start  timestamptz NOT NULL,
    window_count  integer     NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, correspondent)
);

-- One row; version grows with every directory change.
CREATE TABLE directory_version (
    id         integer PRIMARY KEY CHECK (id = 1),
    version    bigint      NOT NULL,
    changed_at timestamptz NOT NULL
);
INSERT INTO directory_version (id, version, changed_at) VALUES (1, 0, now());

CREATE FUNCTION directory_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    new_version bigint;
BEGIN
    UPDATE directory_version SET version = version + 1, changed_at = now()
     WHERE id = 1 RETURNING version INTO new_version;
    PERFORM pg_notify('wsmtp_directory', new_version::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER directory_domains_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON directory_domains
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
CREATE TRIGGER accounts_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
CREATE TRIGGER lists_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON lists
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
CREATE TRIGGER addresses_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON addresses
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
CREATE TRIGGER forwards_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON forwards
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
CREATE TRIGGER list_members_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON list_members
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
CREATE TRIGGER auto_replies_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON auto_replies
    FOR EACH STATEMENT EXECUTE FUNCTION directory_changed();
