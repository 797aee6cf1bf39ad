-- Self-Instruct jobs (kind `self_instruct`) share the queue with fine-tuning jobs. Their seed
-- dataset is in `training_dataset_id` (the nil id for the built-in seed tasks) and the dataset
-- they produce is recorded here.
ALTER TABLE jobs ADD COLUMN result_dataset_id TEXT;
