-- Data only, no table change. The user's stream now owns its notifications: MarkNotificationRead
-- knows only the notifications its own `notification.created` events recorded, and the projector
-- sends RecordNotification (the `record_notification` reaction) for every reminder it applies live.
-- Notifications that were projected before that have no `notification.created` in the log: queue
-- the same reaction once for each that is still unread, so they can still be marked read. The body
-- is the one the live fold writes (`remind_at` as the event recorded it), so a re-send under the
-- same Idempotency-Key is the same request; the command is refused with 409 for a notification the
-- user's stream already knows, which the reactor counts as done. Read ones need nothing: their
-- `notification.read` already makes them known (as read) to the user's stream.
INSERT INTO reaction_outbox (id, kind, user_id, task_id, payload, causation_id)
SELECT n.id, 'record_notification', n.user_id, n.task_id,
       jsonb_build_object('task_id', n.task_id, 'remind_at', h.data -> 'remind_at'), n.event_id
FROM notifications n
JOIN task_history h ON h.event_id = n.event_id AND h.event_type = 'task.reminder_due'
WHERE NOT EXISTS (SELECT 1 FROM notification_reads r WHERE r.notification_id = n.id)
ON CONFLICT (id) DO NOTHING;
