-- Reactions: reminder schedules, in-app notifications, and the outbox of reaction commands.

-- The remind time whose reminder already fired (from task.reminder_due).
ALTER TABLE tasks ADD COLUMN reminded_for timestamptz;

-- Read model `reminder_schedule`: one row per open task whose current reminder has not fired yet.
-- The projector's scheduler picks due rows with FOR UPDATE SKIP LOCKED (safe with two instances).
CREATE TABLE reminder_schedule (
    task_id   uuid        NOT NULL,
    user_id   text        NOT NULL,
    remind_at timestamptz NOT NULL,
    CONSTRAINT reminder_schedule_pkey PRIMARY KEY (task_id)
);
CREATE INDEX reminder_schedule_due_idx ON reminder_schedule (remind_at);

-- Read model `notifications`: one per task.reminder_due.
CREATE TABLE notifications (
    id         uuid        NOT NULL,
    user_id    text        NOT NULL,
    task_id    uuid        NOT NULL,
    kind       text        NOT NULL,
    message    text        NOT NULL,
    created_at timestamptz NOT NULL,
    read_at    timestamptz,
    event_id   uuid        NOT NULL,
    CONSTRAINT notifications_pkey PRIMARY KEY (id)
);
CREATE INDEX notifications_user_idx ON notifications (user_id, created_at DESC, id DESC);

-- Reaction commands decided while applying live events, written in the same transaction as the
-- batch and sent to the command API afterwards (an outbox): a crash between the two re-sends, and
-- the command's deterministic id makes the re-send harmless. Never written during a replay.
CREATE TABLE reaction_outbox (
    id              uuid        NOT NULL,
    kind            text        NOT NULL,
    user_id         text        NOT NULL,
    task_id         uuid        NOT NULL,
    payload         jsonb       NOT NULL,
    causation_id    uuid        NOT NULL,
    correlation_id  text,
    traceparent     text,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    failed          boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reaction_outbox_pkey PRIMARY KEY (id)
);
CREATE INDEX reaction_outbox_next_idx ON reaction_outbox (next_attempt_at) WHERE NOT failed;
