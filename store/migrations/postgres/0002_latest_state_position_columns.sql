-- Position details of latest_state as columns (issue #4): the batch upsert binds typed arrays
-- instead of one JSON text per subject that the server had to parse. position_extra stays for
-- rows written before; readers prefer the columns when set.
ALTER TABLE latest_state
    ADD COLUMN course_deg REAL,
    ADD COLUMN altitude_m REAL,
    ADD COLUMN satellites SMALLINT,
    ADD COLUMN fix_source TEXT;

-- Every batch rewrites the row of each subject it carries: room on the page keeps those updates
-- HOT (no index entry, no new page), which is most of the upsert's cost otherwise.
ALTER TABLE latest_state SET (fillfactor = 50);
