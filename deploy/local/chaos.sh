#!/usr/bin/env bash
# The broker and database faults of `./dev chaos`, run by the chaos binary (never by hand on a stack
# you care about): one action per call, on the local Kafka and PostgreSQL of deploy/local/lib.sh
# that the environment names (LOCAL_DIR, KAFKA_PORT, KAFKA_CONTROLLER_PORT, PG_PORT; ./dev chaos
# points them at a private pair under .local/chaos, never at the broker and cluster of ./dev up).
#
#   chaos.sh kafka-pid          prints the pid of the broker lib.sh started from LOCAL_DIR
#   chaos.sh kafka-start        starts it again (after a kill -9) and waits until it serves
#   chaos.sh postgres-restart   restarts the PostgreSQL cluster of LOCAL_DIR with a fast shutdown
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=deploy/local/lib.sh
source "$ROOT/deploy/local/lib.sh"

case "${1:-}" in
  kafka-pid)
    kafka_pid || die "no Kafka broker of $(shown "$KAFKA_DIR") is running"
    ;;
  kafka-start)
    # ensure_kafka uses KAFKA_BROKERS as it is when set: here the point is to start our own.
    unset KAFKA_BROKERS
    ensure_kafka
    ;;
  postgres-restart)
    [ -f "$PG_DIR/data/postmaster.pid" ] || die "no PostgreSQL cluster of $(shown "$PG_DIR") is running"
    bin=$(pg_bin)
    t0=$(now_ms)
    as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -m fast -w -t 60 restart >/dev/null \
      || die "pg_ctl restart failed (log: $(shown "$PG_DIR")/postgres.log)"
    say "PostgreSQL restarted (fast shutdown) in $(since "$t0")"
    ;;
  *)
    die "usage: deploy/local/chaos.sh kafka-pid | kafka-start | postgres-restart"
    ;;
esac
