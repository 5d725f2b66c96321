-- User-level read models (from notification.read / webhook.* events) and webhook delivery state.

-- Read marks are kept apart from `notifications`: a user's events and a task's events live on
-- different partitions, so a read mark may be applied before its notification row.
CREATE TABLE notification_reads (
    notification_id uuid        NOT NULL,
    user_id         text        NOT NULL,
    read_at         timestamptz NOT NULL,
    CONSTRAINT notification_reads_pkey PRIMARY KEY (notification_id)
);

-- The registered webhook of each user (url NULL once removed); `version` is the user stream's.
CREATE TABLE webhooks (
    user_id    text        NOT NULL,
    url        text,
    secret     text,
    version    integer     NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT webhooks_pkey PRIMARY KEY (user_id)
);

-- One delivery per notification to the user's webhook (live mode only), retried with backoff.
CREATE TABLE webhook_deliveries (
    id              uuid        NOT NULL,
    notification_id uuid        NOT NULL,
    user_id         text        NOT NULL,
    url             text        NOT NULL,
    payload         jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'pending',
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    CONSTRAINT webhook_deliveries_pkey PRIMARY KEY (id),
    CONSTRAINT webhook_deliveries_status_check CHECK (status IN ('pending', 'delivered', 'failed', 'cancelled'))
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_notification_idx ON webhook_deliveries (notification_id);

CREATE TABLE webhook_attempts (
    delivery_id  uuid        NOT NULL,
    attempt      integer     NOT NULL,
    attempted_at timestamptz NOT NULL,
    status_code  integer,
    error        text,
    duration_ms  integer     NOT NULL,
    CONSTRAINT webhook_attempts_pkey PRIMARY KEY (delivery_id, attempt)
);
