-- The router claims recipients through recipients_queued_idx, and every
-- other query on queued recipients is served by it too, so the index on
-- (state, next_attempt_at) from V1 only cost an entry per inserted row and
-- per updated row version.
DROP INDEX recipients_claim_idx;

-- A claim changes only lease columns, which no index covers, so PostgreSQL
-- can update the row in place (a HOT update, without new index entries)
-- when its page has room for the new version. Pages filled to 70 % keep
-- that room.
ALTER TABLE recipients SET (fillfactor = 70);
