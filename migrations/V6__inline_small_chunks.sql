-- Chunk data has storage EXTERNAL, so it is never compressed. By default a
-- row longer than about 2 KB is still moved to the TOAST table, which
-- costs two more heap rows and index entries for a 4 KB chunk on insert and
-- again on delete. With the target at the maximum, chunks of small
-- messages (up to about 8 KB) stay in the table's own pages; larger chunks
-- are still stored out of line.
ALTER TABLE message_chunks SET (toast_tuple_target = 8160);
