-- Why a reaction or a reminder has not gone through yet (issue 11, defect 3). The reactor classifies
-- every answer of the command API (`projector::reactor::classify`): done (2xx); already done or no
-- longer applicable (404 `not-found`, 409 `conflict`, and 422 `idempotency-key-reused` for a
-- reaction's key); refused for what the command says (other 400/413/415/422 problems: an outbox row
-- is then marked failed, a reminder is kept); or to be retried, with backoff and never given up:
-- `auth` (401/403, no SERVICE_JWT_SECRET), `config` (an answer that is not the command API's, e.g. a
-- wrong COMMAND_API_URL), `unavailable` (5xx, 408, 429, timeouts, connection errors).

-- The failure of a reaction's last attempt (NULL before any failed attempt).
ALTER TABLE reaction_outbox ADD COLUMN failure text;

-- Reminders whose firing failed, waiting for their next attempt. Apart from the read model
-- `reminder_schedule` (which stays identical to a rebuild) and keyed by the reminder itself, so a
-- rescheduled reminder starts afresh; rows whose reminder left the schedule are deleted by the
-- reactor and never counted.
CREATE TABLE reminder_attempts (
    task_id         uuid        NOT NULL,
    remind_at       timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    next_attempt_at timestamptz NOT NULL,
    failure         text        NOT NULL,
    last_error      text        NOT NULL,
    CONSTRAINT reminder_attempts_pkey PRIMARY KEY (task_id, remind_at)
);

-- Reactions marked failed before this change gave up on answers that are now retried (401, 5xx
-- after 12 attempts) or counted as done (a reused Idempotency-Key): send them once more. The ids
-- are deterministic, so a re-send never creates anything twice; a real refusal is marked again.
UPDATE reaction_outbox SET failed = false, attempts = 0, next_attempt_at = now() WHERE failed;
