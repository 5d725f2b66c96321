-- Erasure by crypto-shredding (`user.erased`): each history row names the data key its event was
-- sealed with (`ce_datakey`; NULL for events written before sealing), so an erasure removes exactly
-- the rows of the keys it destroys, whatever order the partitions are applied in. The second index
-- finds a user's rows written before sealing; it holds no row written since (no cost per insert).
ALTER TABLE task_history ADD COLUMN data_key uuid;
CREATE INDEX task_history_data_key_idx ON task_history (data_key) WHERE data_key IS NOT NULL;
CREATE INDEX task_history_unsealed_user_idx ON task_history (user_id) WHERE data_key IS NULL;
