-- Deleting a completed message cascades to its batches and recipients, and
-- each of those deletes looks for the deliveries that refer to it. Without
-- these indexes every such look is a sequential scan of all deliveries.
CREATE INDEX deliveries_batch_idx ON deliveries (batch_id);
CREATE INDEX deliveries_recipient_idx ON deliveries (recipient_id);
