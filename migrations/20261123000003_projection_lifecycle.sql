-- Projection lifecycle: dead letters with parking, and rebuild state.

-- A record the projector could not decode or apply after bounded retries. It was also produced to
-- the dead-letter topic (`<topic>.dlq`); this row is what `projector dlq` works on. While a task's
-- (or user's) dead letter is open, its later records are parked in `parked_records`, in log order,
-- so no view is built from a gap.
CREATE TABLE dead_letters (
    id            bigserial   NOT NULL,
    topic         text        NOT NULL,
    partition     integer     NOT NULL,
    log_offset    bigint      NOT NULL,
    record_key    text        NOT NULL,
    event_type    text,
    projection    text        NOT NULL,
    error         text        NOT NULL,
    status        text        NOT NULL DEFAULT 'open',
    header_names  text[]      NOT NULL,
    header_values bytea[]     NOT NULL,
    payload       bytea,
    created_at    timestamptz NOT NULL DEFAULT now(),
    resolved_at   timestamptz,
    CONSTRAINT dead_letters_pkey PRIMARY KEY (id),
    CONSTRAINT dead_letters_position_key UNIQUE (topic, partition, log_offset),
    CONSTRAINT dead_letters_status_check CHECK (status IN ('open', 'replayed', 'discarded'))
);
CREATE INDEX dead_letters_open_key_idx ON dead_letters (topic, record_key) WHERE status = 'open';

-- Records held back behind an open dead letter of the same key.
CREATE TABLE parked_records (
    topic          text    NOT NULL,
    partition      integer NOT NULL,
    log_offset     bigint  NOT NULL,
    record_key     text    NOT NULL,
    dead_letter_id bigint  NOT NULL REFERENCES dead_letters (id),
    header_names   text[]  NOT NULL,
    header_values  bytea[] NOT NULL,
    payload        bytea,
    CONSTRAINT parked_records_pkey PRIMARY KEY (topic, partition, log_offset)
);
CREATE INDEX parked_records_dead_letter_idx ON parked_records (dead_letter_id);

-- Rebuilds in progress (`projector rebuild`), for `projector status`: one row per projection.
CREATE TABLE projection_rebuilds (
    projection   text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    events_done  bigint      NOT NULL DEFAULT 0,
    events_total bigint      NOT NULL DEFAULT 0,
    -- 'cli' (projector rebuild) or 'new-projection' (started by the live projector for a
    -- projection without stored offsets; resumed after a restart).
    requested_by text        NOT NULL DEFAULT 'cli',
    CONSTRAINT projection_rebuilds_pkey PRIMARY KEY (projection)
);
