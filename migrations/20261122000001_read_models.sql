-- Read models built by the projector from the `task-events` log. Every row here can be rebuilt by
-- replaying the log from offset zero.

-- Per projection and partition: the next log offset to apply. Written in the same transaction as the
-- projection's rows, which is what makes the read models exactly-once with respect to the log.
CREATE TABLE projection_offsets (
    projection  text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    next_offset bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT projection_offsets_pkey PRIMARY KEY (projection, topic, partition),
    CONSTRAINT projection_offsets_offset_nonneg CHECK (next_offset >= 0)
);

-- Projection `tasks`: the current state of every task that exists (deleted tasks are removed).
CREATE TABLE tasks (
    id                   uuid        NOT NULL,
    user_id              text        NOT NULL,
    title                text        NOT NULL,
    description          text,
    status               text        NOT NULL,
    priority             smallint    NOT NULL,
    due_at               timestamptz,
    timezone             text        NOT NULL,
    recurrence           text,
    remind_before        text,
    remind_at            timestamptz,
    tags                 text[]      NOT NULL DEFAULT '{}',
    version              integer     NOT NULL,
    created_at           timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL,
    completed_at         timestamptz,
    recurrence_parent_id uuid,
    occurrence           integer,
    CONSTRAINT tasks_pkey PRIMARY KEY (id),
    CONSTRAINT tasks_status_check CHECK (status IN ('open', 'completed')),
    CONSTRAINT tasks_priority_check CHECK (priority BETWEEN 0 AND 3),
    CONSTRAINT tasks_version_positive CHECK (version > 0)
);
CREATE INDEX tasks_user_due_idx ON tasks (user_id, due_at, id);
CREATE INDEX tasks_user_created_idx ON tasks (user_id, created_at, id);
CREATE INDEX tasks_user_status_idx ON tasks (user_id, status);
CREATE INDEX tasks_tags_idx ON tasks USING gin (tags);

-- Projection `task_history`: every event of every task, kept after deletion.
CREATE TABLE task_history (
    event_id       uuid        NOT NULL,
    task_id        uuid        NOT NULL,
    user_id        text        NOT NULL,
    version        integer     NOT NULL,
    event_type     text        NOT NULL,
    schema_version integer     NOT NULL,
    occurred_at    timestamptz NOT NULL,
    data           jsonb       NOT NULL,
    correlation_id text,
    causation_id   text,
    log_partition  integer     NOT NULL,
    log_offset     bigint      NOT NULL,
    CONSTRAINT task_history_pkey PRIMARY KEY (event_id),
    CONSTRAINT task_history_task_version_key UNIQUE (task_id, version)
);
