-- Projectors as a consumer group (issue 10) and reminders fired without row locks held across
-- network calls (issue 11, defect 5).

-- Which projector instance owns which partition of the log, for display only (`projector status`):
-- Kafka's consumer group decides ownership; an instance upserts its row once it has sought to the
-- partition's stored offset and deletes it (its own row only) when the partition is revoked. A
-- killed instance's rows stay until the new owner upserts them.
CREATE TABLE projector_partition_owners (
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    instance_id text        NOT NULL,
    address     text        NOT NULL,
    assigned_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projector_partition_owners_pkey PRIMARY KEY (topic, partition)
);

-- Claims (leases): a reactor claims due outbox rows and reminders in a short transaction, sends
-- them outside it (concurrently), then records the outcome. Another instance skips a row while
-- its claim runs (`claimed_until` in the future); a claim of a crashed instance expires.
ALTER TABLE reaction_outbox ADD COLUMN claimed_by text, ADD COLUMN claimed_until timestamptz;

-- `reminder_attempts` becomes the reactor's working state of a due reminder: its claim, and after
-- a failed attempt, the failure and the next attempt. A claimed reminder that has not failed yet has
-- no failure (NULL) and 0 attempts. The read model `reminder_schedule` stays identical to a rebuild.
ALTER TABLE reminder_attempts
    ALTER COLUMN failure DROP NOT NULL,
    ALTER COLUMN last_error DROP NOT NULL,
    ALTER COLUMN attempts SET DEFAULT 0,
    ALTER COLUMN next_attempt_at SET DEFAULT now(),
    ADD COLUMN claimed_by text,
    ADD COLUMN claimed_until timestamptz;
