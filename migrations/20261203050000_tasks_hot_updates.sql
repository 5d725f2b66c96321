-- Updates of `tasks` rows in place (PostgreSQL's heap-only tuples): an UPDATE that changes no
-- indexed column and finds room in the row's page writes no index entry at all. Most events change
-- only unindexed columns (title, version, updated_at, status, completed_at), so:
-- * pages keep 20% free for the new row versions (fillfactor; rows inserted from now on);
-- * the index on (user_id, status) goes: every completion and reopening changed it, so none of them
--   could be updated in place, and each wrote all four indexes. The list queries filter status
--   while they walk one of the ordering indexes (due, created), which serve a user's page as before;
--   `stats` counts a user's tasks through the same (user_id, …) prefix.
ALTER TABLE tasks SET (fillfactor = 80);
DROP INDEX tasks_user_status_idx;
