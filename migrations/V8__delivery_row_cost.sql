-- A delivery is written by the router in the transaction that creates its
-- batch and routes its recipient, and is deleted only with its message
-- (deliveries_message_id_fkey cascades). The foreign keys to the batch and
-- to the recipient therefore guarded nothing that the message's cascade
-- does not, but each cost two lookups and two row locks per inserted
-- delivery, and two index entries per row version of a table whose rows
-- are updated at every claim and every attempt. The indexes existed only
-- for the cascades of those keys.
ALTER TABLE deliveries
    DROP CONSTRAINT deliveries_batch_id_fkey,
    DROP CONSTRAINT deliveries_recipient_id_fkey;
DROP INDEX deliveries_batch_idx;
DROP INDEX deliveries_recipient_idx;
