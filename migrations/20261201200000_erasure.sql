-- Erasure by crypto-shredding (`user.erased`): each history row names the data key its event was
-- sealed with (`ce_datakey`; NULL for events written before sealing), so an erasure removes exactly
-- the tasks of the keys it destroys, whatever order the partitions are applied in. A task's events
-- all use one key, so only the creations are indexed (by key; and by user for the creations written
-- before sealing, an index that no new row enters): most inserts maintain no extra index.
ALTER TABLE task_history ADD COLUMN data_key uuid;
CREATE INDEX task_history_created_key_idx ON task_history (data_key) WHERE event_type = 'task.created' AND data_key IS NOT NULL;
CREATE INDEX task_history_created_unsealed_idx ON task_history (user_id) WHERE event_type = 'task.created' AND data_key IS NULL;
