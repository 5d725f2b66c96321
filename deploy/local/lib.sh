# shellcheck shell=bash
# shellcheck disable=SC2034,SC2012  # STARTED_* are read by ./dev; ls -d of a fixed glob is fine
# Local Apache Kafka and PostgreSQL for ./dev (sourced, never run). Everything lives under
# $ROOT/.local, which git ignores:
#
#   .local/kafka/libs/        Kafka runtime jars ($KAFKA_VERSION below), resolved from Maven Central by mvn
#                             (once, and again when deploy/local/kafka/pom.xml changes)
#   .local/kafka/data/        KRaft log dirs of the single combined broker+controller node (formatted
#                             with a standalone dynamic quorum); data.version says which Kafka formatted it
#   .local/kafka/kafka.log    broker log (log4j2), kafka.pid, server.properties, cluster-id
#   .local/pg/data/           private PostgreSQL cluster (127.0.0.1:15432, trust auth)
#   .local/pg/run/            its unix socket; .local/pg/postgres.log its log
#
# A broker of another Kafka version left running (or a data dir formatted) by an older checkout is
# stopped and its data dir formatted again by ensure_kafka, with a message: local topics are test data.
#
# Overrides (environment): LOCAL_DIR (default $ROOT/.local), KAFKA_PORT (9092),
# KAFKA_CONTROLLER_PORT (9093), PG_PORT (15432) and KAFKA_LIBS (the jars, default $LOCAL_DIR/kafka/libs:
# a second pair can share the first one's), e.g. to try a second broker beside the usual one:
#   LOCAL_DIR=/tmp/k KAFKA_PORT=19092 KAFKA_CONTROLLER_PORT=19093 bash -c '. deploy/local/lib.sh && ensure_kafka'
#   LOCAL_DIR=/tmp/k bash -c '. deploy/local/lib.sh && stop_kafka'
#
# Kafka's command-line tools run from the same jars, e.g.
#   java -cp ".local/kafka/libs/*" org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 --list
#   java -cp ".local/kafka/libs/*" org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server 127.0.0.1:9092 \
#     --topic task-events --from-beginning --property print.headers=true
#   java -cp ".local/kafka/libs/*" org.apache.kafka.tools.FeatureCommand --bootstrap-server 127.0.0.1:9092 describe
#
# Functions: ensure_kafka, ensure_postgres, stop_local (and stop_kafka, stop_postgres).
# ensure_kafka exports KAFKA_BROKERS, TASKSTREAM_KAFKA_LIBS and (local broker) TASKSTREAM_KAFKA_DATA;
# ensure_postgres exports DATABASE_URL.
# When KAFKA_BROKERS / DATABASE_URL are already set they are used as they are.
# STARTED_KAFKA / STARTED_PG are 1 when this shell started the broker / the cluster.

if [ -z "${ROOT:-}" ]; then
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
fi

LOCAL_DIR="${LOCAL_DIR:-$ROOT/.local}"
# The Apache Kafka release of the local broker: the same in deploy/local/kafka/pom.xml,
# deploy/docker-compose.yml and deploy/k8s/kafka.yaml (tests/tests/deploy.rs checks it).
KAFKA_VERSION=4.4.0
KAFKA_DIR="$LOCAL_DIR/kafka"
KAFKA_LIBS="${KAFKA_LIBS:-$KAFKA_DIR/libs}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_START_TIMEOUT=90
PG_DIR="$LOCAL_DIR/pg"
# Below the kernel's ephemeral port range (32768-60999 by default): a port in it may be held for a
# minute by the TIME-WAIT of an outgoing connection that was given it, and PostgreSQL then cannot
# listen on it ("Address already in use"; seen with 55432 after a chaos run). Kafka's 9092/9093 are below it too.
PG_PORT="${PG_PORT:-15432}"
PG_DB=taskstream
PG_MAX_CONNECTIONS=200
STARTED_KAFKA=0
STARTED_PG=0

if [ -t 2 ]; then
  _C_SAY=$'\033[1;34m' _C_WARN=$'\033[1;33m' _C_ERR=$'\033[1;31m' _C_OFF=$'\033[0m'
else
  _C_SAY='' _C_WARN='' _C_ERR='' _C_OFF=''
fi
say() { printf '%s==>%s %s\n' "$_C_SAY" "$_C_OFF" "$*" >&2; }
warn() { printf '%swarning:%s %s\n' "$_C_WARN" "$_C_OFF" "$*" >&2; }
die() { printf '%serror:%s %s\n' "$_C_ERR" "$_C_OFF" "$*" >&2; exit 1; }

now_ms() { date +%s%3N; }
since() { # start_ms -> "1.2 s"
  local ms=$(($(now_ms) - $1))
  printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100))
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

apt_install() {
  if [ "$(id -u)" -ne 0 ]; then
    die "$* is needed but not installed, and only root can apt-get install it: install it, then run this again"
  fi
  command -v apt-get >/dev/null || die "$* is needed but not installed (and there is no apt-get here): install it first"
  say "installing $* with apt-get (first run only)"
  apt-get update -qq >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null \
    || die "apt-get install $* failed"
}

# --- Kafka -----------------------------------------------------------------------------------

shown() { printf '%s' "${1#"$ROOT"/}"; } # a path as messages show it: relative inside the checkout

# A Python virtual environment in dir with exactly these PyPI packages ("name==version" ...), made
# afresh (python3 and its venv module from apt when missing); what is "the tool" in the messages.
# The caller checks first whether the installed versions are the ones it wants.
pip_venv() { # dir what package...
  local dir=$1 what=$2 t0 log
  shift 2
  command -v python3 >/dev/null || apt_install python3 python3-venv
  # Debian ships venv's ensurepip in python3-venv.
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
  say "installing $what ($*) from PyPI into $(shown "$dir") (first run only)"
  log="$dir-install.log"
  t0=$(now_ms)
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  if ! { python3 -m venv "$dir" && "$dir/bin/pip" install --disable-pip-version-check -q "$@"; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -rf "$dir"
    die "could not install $what (full output: $(shown "$log")); PyPI must be reachable (proxy: PIP_INDEX_URL / pip.conf)"
  fi
  say "installed $what in $(since "$t0")"
}

kafka_pom_digest() { sha256sum "$ROOT/deploy/local/kafka/pom.xml" | cut -c1-16; }

fetch_kafka_jars() {
  command -v java >/dev/null || apt_install default-jre-headless
  local marker
  marker=".complete-$KAFKA_VERSION-$(kafka_pom_digest)" # a changed pom.xml fetches again
  if [ -f "$KAFKA_LIBS/$marker" ]; then
    return
  fi
  command -v mvn >/dev/null || apt_install maven
  if [ -d "$KAFKA_LIBS" ]; then
    say "fetching Kafka $KAFKA_VERSION jars from Maven Central again (deploy/local/kafka/pom.xml changed)"
  else
    say "fetching Kafka $KAFKA_VERSION jars from Maven Central (first run only)"
  fi
  local t0 tmp="$KAFKA_DIR/libs.partial"
  t0=$(now_ms)
  mkdir -p "$KAFKA_DIR"
  rm -rf "$tmp"
  if ! mvn -B -q -Dstyle.color=never -f "$ROOT/deploy/local/kafka/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_DIR/mvn.log" 2>&1; then
    tail -n 30 "$KAFKA_DIR/mvn.log" >&2
    die "mvn could not fetch the Kafka jars (full output: $(shown "$KAFKA_DIR")/mvn.log); Maven Central must be reachable (proxy: ~/.m2/settings.xml)"
  fi
  [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] \
    || die "mvn finished but kafka_2.13-$KAFKA_VERSION.jar is missing from $tmp (KAFKA_VERSION in deploy/local/lib.sh and deploy/local/kafka/pom.xml must agree)"
  # Swap the jars in file by file (rename), so a broker running from the old ones is not disturbed.
  local wanted f
  wanted=$(cd "$tmp" && ls -- *.jar)
  mkdir -p "$KAFKA_LIBS"
  rm -f "$KAFKA_LIBS"/.complete-*
  mv -f "$tmp"/*.jar "$KAFKA_LIBS"/
  for f in "$KAFKA_LIBS"/*.jar; do
    grep -qxF -- "${f##*/}" <<<"$wanted" || rm -f "$f"
  done
  rm -rf "$tmp"
  touch "$KAFKA_LIBS/$marker"
  say "fetched $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars ($(du -sh "$KAFKA_LIBS" | cut -f1)) in $(since "$t0")"
}

kafka_java() { # runs a Kafka main class from the cached jars, logging to kafka.log (log4j2)
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" "$@"
}

# The pid of the broker this script started, if it is still running.
kafka_pid() {
  local pid
  [ -f "$KAFKA_DIR/kafka.pid" ] || return 1
  pid=$(cat "$KAFKA_DIR/kafka.pid")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid: it must be our java with our server.properties.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$KAFKA_DIR/server.properties" || return 1
  echo "$pid"
}

# The Kafka version a running broker was started with: the kafka_2.13-<version>.jar it holds open
# (still listed, as "(deleted)", after its jars were swapped for another version's). Empty if unknown.
kafka_running_version() { # pid
  ls -l "/proc/$1/fd" 2>/dev/null | sed -n 's#.*/kafka_2\.13-\([0-9][^/ ]*\)\.jar.*#\1#p' | head -n 1
}

# A broker that an older checkout started from this directory runs another Kafka version (e.g.
# 3.9.1): stop it before its jars are swapped; its data dir is formatted again before the new start.
stop_outdated_kafka() {
  local pid running
  pid=$(kafka_pid) || return 0
  running=$(kafka_running_version "$pid")
  if [ -z "$running" ] || [ "$running" = "$KAFKA_VERSION" ]; then
    return 0
  fi
  warn "the local Kafka broker (pid $pid, $(shown "$KAFKA_DIR")) runs Kafka $running; this checkout uses Kafka $KAFKA_VERSION: stopping it to replace it"
  stop_kafka
}

write_kafka_config() {
  mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
  rm -f "$KAFKA_DIR/log4j.properties" # the log4j 1 configuration of Kafka 3.x
  {
    cat <<PROPS
# Written by deploy/local/lib.sh on every start; edit that file instead.
# One KRaft node that is both broker and controller (Kafka $KAFKA_VERSION).
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
# A dynamic quorum (KIP-853) of this one controller, formatted with --standalone.
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
PROPS
    kafka_node_properties "$KAFKA_DIR"
  } >"$KAFKA_DIR/server.properties"
  write_kafka_log4j "$KAFKA_DIR"
}

# What every local single-node broker shares (this one and the SASL_SSL one of sasl.sh): its data
# folder under dir, one replica of everything, consumer groups that move a killed member's partitions
# quickly, and a log that is kept.
kafka_node_properties() { # dir
  cat <<PROPS
log.dirs=$1/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Consumer groups of the new protocol (KIP-848, group.protocol=consumer): the broker owns the
# session timeout and heartbeat interval. Its defaults (45 s, 5 s; minimums 45 s, 5 s) would keep
# the partitions of a killed member unowned for 45 s; a group may ask for its own values within the
# minimums (group configs consumer.session.timeout.ms, consumer.heartbeat.interval.ms).
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=6000
group.consumer.min.heartbeat.interval.ms=250
group.consumer.heartbeat.interval.ms=1000
# The log is the source of truth: keep it (the broker default deletes segments after 7 days).
log.retention.ms=-1
PROPS
}

# The broker's log4j2 configuration in dir: to kafka.log beside it, never to the terminal.
write_kafka_log4j() { # dir
  cat >"$1/log4j2.properties" <<PROPS
# Written by deploy/local/lib.sh (write_kafka_log4j). The broker logs to kafka.log beside this file, never to the terminal.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $1/kafka.log
appender.file.filePattern = $1/kafka.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
# start-up, shutdown and role changes at INFO; everything else at WARN
logger.main.name = kafka.Kafka
logger.main.level = info
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = info
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = info
logger.controller.name = kafka.server.ControllerServer
logger.controller.level = info
logger.shared.name = kafka.server.SharedServer
logger.shared.level = info
# the transaction coordinator's decisions (producer ids and epochs, loads, markers) at INFO: what
# explains a transaction left open after a restart
logger.txn.name = kafka.coordinator.transaction
logger.txn.level = info
PROPS
}

kafka_cluster_id() {
  local f="$KAFKA_DIR/cluster-id" id
  if [ ! -s "$f" ]; then
    if [ -f "$KAFKA_DIR/data/meta.properties" ]; then # formatted before the id was kept in a file
      sed -n 's/^cluster\.id=//p' "$KAFKA_DIR/data/meta.properties" >"$f"
    else
      kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$f"
    fi
  fi
  id=$(tr -d '[:space:]' <"$f")
  [[ "$id" =~ ^[A-Za-z0-9_-]{22}$ ]] || die "bad Kafka cluster id '$id' in $(shown "$f") (delete $(shown "$KAFKA_DIR") to start over)"
  echo "$id"
}

# Formats the data dir when it is new, or when another Kafka version formatted it (data.version;
# none means the 3.9.1 of older checkouts): its topics are local test data, and a fresh format gets
# this version's features (transaction.version, group.version, ...) at their latest levels.
kafka_format_storage() {
  local formatted="" cluster_id
  [ -f "$KAFKA_DIR/data.version" ] && formatted=$(tr -d '[:space:]' <"$KAFKA_DIR/data.version")
  if [ -f "$KAFKA_DIR/data/meta.properties" ] && [ "$formatted" != "$KAFKA_VERSION" ]; then
    warn "$(shown "$KAFKA_DIR/data") was formatted by Kafka ${formatted:-3.9.1}; formatting it again for Kafka $KAFKA_VERSION: its local topics are discarded (the read models of ./dev up's database then describe a log that is gone: './dev projector rebuild --yes' rebuilds them)"
    rm -rf "$KAFKA_DIR/data" "$KAFKA_DIR/data.version"
    mkdir -p "$KAFKA_DIR/data"
  fi
  [ -f "$KAFKA_DIR/data/meta.properties" ] && return 0
  cluster_id=$(kafka_cluster_id) || exit 1
  say "formatting Kafka storage in $(shown "$KAFKA_DIR/data") (KRaft, single node, cluster id $cluster_id)"
  kafka_java kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$KAFKA_DIR/server.properties" \
    >"$KAFKA_DIR/format.log" 2>&1 || { cat "$KAFKA_DIR/format.log" >&2; die "formatting the Kafka storage failed"; }
  echo "$KAFKA_VERSION" >"$KAFKA_DIR/data.version"
}

ensure_kafka() {
  [ -n "${KAFKA_BROKERS:-}" ] || stop_outdated_kafka
  fetch_kafka_jars
  export TASKSTREAM_KAFKA_LIBS="$KAFKA_LIBS"
  if [ -n "${KAFKA_BROKERS:-}" ]; then
    say "using Kafka at KAFKA_BROKERS=$KAFKA_BROKERS"
    return
  fi
  export KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
  # Where the local broker keeps its segment files (the privacy tests grep them).
  export TASKSTREAM_KAFKA_DATA="$KAFKA_DIR/data"
  local pid
  if port_open "$KAFKA_PORT"; then
    if pid=$(kafka_pid); then
      say "Kafka $KAFKA_VERSION already running on $KAFKA_BROKERS (pid $pid, $(shown "$KAFKA_DIR")); reusing it"
    else
      warn "something that is not $(shown "$KAFKA_DIR") already listens on $KAFKA_BROKERS; using it as Kafka"
    fi
    return
  fi
  if port_open "$KAFKA_CONTROLLER_PORT"; then
    die "127.0.0.1:$KAFKA_CONTROLLER_PORT (the local Kafka controller port) is taken by another process; stop it, or set KAFKA_BROKERS"
  fi
  write_kafka_config
  kafka_format_storage
  local log
  log=$(shown "$KAFKA_DIR/kafka.log")
  say "starting Kafka $KAFKA_VERSION on $KAFKA_BROKERS (log: $log)"
  local t0 log_from=0
  t0=$(now_ms)
  [ -f "$KAFKA_DIR/kafka.log" ] && log_from=$(stat -c %s "$KAFKA_DIR/kafka.log")
  # setsid: its own session, so a Ctrl-C in the terminal does not reach the broker; ./dev stops it.
  # shellcheck disable=SC2086 # KAFKA_JVM_OPTS is a list of flags
  setsid java $KAFKA_JVM_OPTS -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$KAFKA_DIR/log4j2.properties" -Dkafka.logs.dir="$KAFKA_DIR/logs" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" </dev/null >"$KAFKA_DIR/stdout.log" 2>&1 &
  pid=$!
  disown "$pid" 2>/dev/null || true # ./dev chaos kills it on purpose: no "Killed" line from this shell
  echo "$pid" >"$KAFKA_DIR/kafka.pid"
  STARTED_KAFKA=1
  local deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  # Ready = the port accepts connections and the broker logged that it finished starting (the
  # listener is bound a moment before the broker serves requests).
  until port_open "$KAFKA_PORT" && kafka_logged_started "$log_from"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      kafka_show_failure "$log_from"
      rm -f "$KAFKA_DIR/kafka.pid"
      STARTED_KAFKA=0
      die "Kafka exited while starting (logs: $log, $(shown "$KAFKA_DIR/stdout.log"))"
    fi
    if ((SECONDS >= deadline)); then
      kafka_show_failure "$log_from"
      die "Kafka did not come up on $KAFKA_BROKERS within $KAFKA_START_TIMEOUT s (log: $log); it is still running as pid $pid"
    fi
    sleep 0.2
  done
  say "Kafka $KAFKA_VERSION is up on $KAFKA_BROKERS (pid $pid, started in $(since "$t0"))"
}

# The local broker's JVM. It shares a small box with everything it serves, so it runs with C1, the
# JVM's quick compiler, alone (TieredStopAtLevel=1) and keeps what it compiled (no code cache
# flushing). With the default C2 the JIT never settled under load: the sweeper dropped compiled
# request paths between bursts and C2 compiled them again, 22-45 % of the broker's CPU in the
# command benchmark (perf; 22 000 compilations in 9 minutes). Measured with C1 only: the broker
# takes 28-39 % less CPU per command and commands/s rose by about 16 % (saturation runs, 3-4 of each).
# A production broker with cores of its own keeps the JVM's defaults (deploy/k8s, compose).
KAFKA_JVM_OPTS=${KAFKA_JVM_OPTS:--Xmx1g -Xms256m -XX:+UseG1GC -XX:TieredStopAtLevel=1 -XX:-UseCodeCacheFlushing}

kafka_logged_started() { # byte offset of kafka.log when the broker was launched
  local size
  size=$(stat -c %s "$KAFKA_DIR/kafka.log" 2>/dev/null || echo 0)
  ((size >= $1)) || set -- 0 # the log rolled over meanwhile
  tail -c +$(($1 + 1)) "$KAFKA_DIR/kafka.log" 2>/dev/null | grep -q 'Kafka Server started'
}

kafka_show_failure() { # byte offset of kafka.log when the broker was launched
  local errors
  errors=$(tail -c +$(($1 + 1)) "$KAFKA_DIR/kafka.log" 2>/dev/null | grep -E -A1 '^\[[^]]*\] (ERROR|FATAL) ' | grep -v '^--$' | tail -n 8)
  if [ -n "$errors" ]; then
    printf '%s\n' "$errors" >&2
  else
    tail -n 20 "$KAFKA_DIR/kafka.log" >&2 2>/dev/null
  fi
  [ -s "$KAFKA_DIR/stdout.log" ] && tail -n 10 "$KAFKA_DIR/stdout.log" >&2
  return 0
}

stop_kafka() {
  local pid
  if ! pid=$(kafka_pid); then
    rm -f "$KAFKA_DIR/kafka.pid"
    return 0
  fi
  say "stopping Kafka (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 60))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      warn "Kafka did not stop within 60 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$KAFKA_DIR/kafka.pid"
}

# --- PostgreSQL ------------------------------------------------------------------------------

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$d" ]; then
    apt_install postgresql
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [ -n "$d" ] && [ -x "$d/initdb" ] || die "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin"
  echo "$d"
}

as_pg() { # PostgreSQL refuses to run as root: as root, run its programs as the postgres user
  if [ "$(id -u)" -eq 0 ]; then
    (cd "$PG_DIR" && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

pg_prepare_dir() {
  mkdir -p "$PG_DIR/run"
  [ "$(id -u)" -eq 0 ] || return 0
  if ! id postgres >/dev/null 2>&1; then
    say "creating the system user postgres"
    useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home --shell /bin/bash postgres \
      || die "could not create the postgres user"
  fi
  [ "$(stat -c %U "$PG_DIR")" = postgres ] || chown -R postgres: "$PG_DIR"
  [ "$(stat -c %U "$PG_DIR/run")" = postgres ] || chown postgres: "$PG_DIR/run"
  if ! runuser -u postgres -- test -w "$PG_DIR"; then
    local p="" part blocker="$PG_DIR"
    local -a parts
    IFS=/ read -ra parts <<<"${PG_DIR#/}"
    for part in "${parts[@]}"; do
      p="$p/$part"
      if ! runuser -u postgres -- test -x "$p"; then blocker=$p; break; fi
    done
    die "PostgreSQL refuses to run as root, so ./dev runs it as the postgres user, who cannot reach $PG_DIR (blocked at $blocker). Make the path traversable (e.g. chmod o+x $blocker), move the checkout, or set DATABASE_URL to a PostgreSQL of your own."
  fi
}

pg_write_config() {
  local conf="$PG_DIR/data/taskstream.conf"
  cat >"$conf" <<CONF
# Written by deploy/local/lib.sh on every run (included from postgresql.conf); edit that file instead.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR/run'
max_connections = $PG_MAX_CONNECTIONS
shared_buffers = 256MB
# durability stays at the defaults (the projector's exactly-once relies on committed = durable)
fsync = on
synchronous_commit = on
full_page_writes = on
# A catch-up or rebuild writes WAL fast: with the default 1GB, checkpoints came every ~25 s ("checkpoints
# are occurring too frequently"), and each one makes the next write of every page log a full image.
max_wal_size = 4GB
checkpoint_timeout = 15min
CONF
  [ "$(id -u)" -ne 0 ] || chown postgres: "$conf"
  grep -q "^include_if_exists = 'taskstream.conf'" "$PG_DIR/data/postgresql.conf" \
    || printf "\n# taskstream (./dev)\ninclude_if_exists = 'taskstream.conf'\n" >>"$PG_DIR/data/postgresql.conf"
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    say "using PostgreSQL at DATABASE_URL (set by you)"
    return
  fi
  local bin
  bin=$(pg_bin) || exit 1
  pg_prepare_dir
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    say "creating a private PostgreSQL $(basename "$(dirname "$bin")") cluster in .local/pg/data (first run only)"
    rm -rf "$PG_DIR/data"
    if ! as_pg "$bin/initdb" -D "$PG_DIR/data" --auth=trust -U postgres --encoding=UTF8 --no-locale \
      >"$PG_DIR/initdb.log" 2>&1; then
      cat "$PG_DIR/initdb.log" >&2
      rm -rf "$PG_DIR/data"
      die "initdb failed"
    fi
  fi
  pg_write_config
  local up=0 listening
  if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    up=1
    listening=$(sed -n 4p "$PG_DIR/data/postmaster.pid" 2>/dev/null)
    if [ -n "$listening" ] && [ "$listening" != "$PG_PORT" ]; then
      # Started by an older checkout (whose default was 55432), or with another PG_PORT.
      warn "the cluster in .local/pg runs on port $listening, not $PG_PORT; using it ('./dev down' and start again to move it)"
      PG_PORT=$listening
    fi
  fi
  local psql=("$bin/psql" -X -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ "$up" = 1 ]; then
    say "PostgreSQL already running on 127.0.0.1:$PG_PORT (.local/pg); reusing it"
    local running
    running=$("${psql[@]}" -d postgres -c 'SHOW max_connections' 2>/dev/null || true)
    if [ -n "$running" ] && [ "$running" != "$PG_MAX_CONNECTIONS" ]; then
      warn "it runs with max_connections=$running instead of $PG_MAX_CONNECTIONS; './dev down' and start again to apply"
    fi
  else
    if port_open "$PG_PORT"; then
      die "127.0.0.1:$PG_PORT is taken by another process (not the cluster in .local/pg); stop it, or set DATABASE_URL"
    fi
    say "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: .local/pg/postgres.log)"
    local t0
    t0=$(now_ms)
    if ! as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null; then
      tail -n 20 "$PG_DIR/postgres.log" >&2
      if tail -n 20 "$PG_DIR/postgres.log" | grep -q 'Address already in use' && command -v ss >/dev/null; then
        warn "what holds 127.0.0.1:$PG_PORT (a connection in TIME-WAIT lets it go within a minute; or set PG_PORT):"
        ss -tan "( sport = :$PG_PORT )" >&2 || true
      fi
      die "PostgreSQL did not start (log: .local/pg/postgres.log)"
    fi
    STARTED_PG=1
    say "PostgreSQL is up (started in $(since "$t0"))"
  fi
  if [ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]; then
    say "creating database $PG_DB"
    "${psql[@]}" -d postgres -c "CREATE DATABASE $PG_DB" || die "could not create database $PG_DB"
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/$PG_DB"
}

stop_postgres() {
  [ -f "$PG_DIR/data/postmaster.pid" ] || return 0
  local bin
  bin=$(pg_bin) || exit 1
  if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    say "stopping PostgreSQL (.local/pg)"
    as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w -t 60 stop >/dev/null || warn "pg_ctl stop failed (log: .local/pg/postgres.log)"
  fi
}

# Stops the broker and the cluster that live under .local (never anything else).
stop_local() {
  local any=0
  if kafka_pid >/dev/null; then any=1; fi
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then any=1; fi
  if [ "$any" = 0 ]; then
    say "nothing to stop: no Kafka or PostgreSQL from .local is running"
    return 0
  fi
  stop_kafka
  stop_postgres
}
