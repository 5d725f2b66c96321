# Local Kafka and PostgreSQL for ./dev. Sourced; everything lives under $ROOT/.local (ignored by git).
# shellcheck shell=bash

LOCAL="$ROOT/.local"
KAFKA_VERSION=3.9.1
KAFKA_DIR="$LOCAL/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
PG_DIR="$LOCAL/pg"
PG_PORT=55432
STARTED_KAFKA=0
STARTED_PG=0

say() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }
warn() { printf '\033[1;33mwarning:\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds what logfile
  local deadline=$((SECONDS + $2))
  until port_open "$1"; do
    if ((SECONDS > deadline)); then
      [ -f "$4" ] && tail -n 30 "$4" >&2
      die "$3 did not open port $1 within $2 s (log: $4)"
    fi
    sleep 0.2
  done
}

apt_install() {
  say "installing $* with apt-get"
  if [ "$(id -u)" -ne 0 ]; then die "need root to apt-get install $* (or install it yourself)"; fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

fetch_kafka_jars() {
  if [ -f "$KAFKA_LIBS/.complete-$KAFKA_VERSION" ]; then
    return
  fi
  command -v java >/dev/null || apt_install default-jre-headless
  command -v mvn >/dev/null || apt_install maven
  say "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central (first run only)"
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$KAFKA_LIBS"
  mvn -B -q -Dstyle.color=never -f "$ROOT/deploy/local/kafka/pom.xml" \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" >&2 || die "mvn could not fetch the Kafka jars"
  touch "$KAFKA_LIBS/.complete-$KAFKA_VERSION"
}

ensure_kafka() {
  fetch_kafka_jars
  export TASKSTREAM_KAFKA_LIBS="$KAFKA_LIBS"
  if [ -n "${KAFKA_BROKERS:-}" ]; then
    say "using Kafka at KAFKA_BROKERS=$KAFKA_BROKERS"
    return
  fi
  export KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
  if port_open "$KAFKA_PORT"; then
    say "Kafka already listening on $KAFKA_BROKERS; reusing it"
    return
  fi
  mkdir -p "$KAFKA_DIR/data" "$KAFKA_DIR/logs"
  cat >"$KAFKA_DIR/server.properties" <<PROPS
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
log.dirs=$KAFKA_DIR/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
  cat >"$KAFKA_DIR/log4j.properties" <<PROPS
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File=$KAFKA_DIR/kafka.log
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
PROPS
  if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
    say "formatting Kafka storage (KRaft, single node)"
    java -cp "$KAFKA_LIBS/*" -Dlog4j.configuration="file:$KAFKA_DIR/log4j.properties" \
      kafka.tools.StorageTool format -t "tAsKsTrEaMlOcAlClUsTr1" -c "$KAFKA_DIR/server.properties" >/dev/null \
      || die "formatting Kafka storage failed"
  fi
  say "starting Kafka $KAFKA_VERSION on $KAFKA_BROKERS (log: .local/kafka/kafka.log)"
  nohup java -Xms256m -Xmx1g -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$KAFKA_DIR/log4j.properties" -Dkafka.logs.dir="$KAFKA_DIR/logs" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/stdout.log" 2>&1 &
  echo $! >"$KAFKA_DIR/kafka.pid"
  STARTED_KAFKA=1
  wait_port "$KAFKA_PORT" 90 "Kafka" "$KAFKA_DIR/kafka.log"
}

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$d" ]; then
    apt_install postgresql
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [ -n "$d" ] || die "PostgreSQL binaries not found after installing"
  echo "$d"
}

as_pg() { # run a PostgreSQL program as the postgres user when we are root
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_postgres() {
  if [ -n "${DATABASE_URL:-}" ]; then
    say "using PostgreSQL at DATABASE_URL"
    return
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/taskstream"
  local bin
  bin=$(pg_bin)
  mkdir -p "$PG_DIR/run"
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    chown -R postgres: "$PG_DIR"
    runuser -u postgres -- test -x "$PG_DIR" || die "the postgres user cannot reach $PG_DIR; make the path to the checkout traversable (chmod o+x on its parents)"
  fi
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    say "creating a private PostgreSQL cluster in .local/pg"
    as_pg "$bin/initdb" -D "$PG_DIR/data" --auth=trust -U postgres --encoding=UTF8 --no-locale >/dev/null \
      || die "initdb failed"
    cat >>"$PG_DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR/run'
max_connections = 300
shared_buffers = 256MB
CONF
  fi
  if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    say "PostgreSQL already running on 127.0.0.1:$PG_PORT; reusing it"
  else
    say "starting PostgreSQL on 127.0.0.1:$PG_PORT (log: .local/pg/postgres.log)"
    as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 start >/dev/null \
      || { tail -n 20 "$PG_DIR/postgres.log" >&2; die "PostgreSQL did not start"; }
    STARTED_PG=1
  fi
  if ! as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='taskstream'" postgres | grep -q 1; then
    as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE taskstream" postgres >/dev/null
  fi
}

stop_kafka() {
  if [ -f "$KAFKA_DIR/kafka.pid" ]; then
    local pid
    pid=$(cat "$KAFKA_DIR/kafka.pid")
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping Kafka"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$KAFKA_DIR/kafka.pid"
  fi
}

stop_postgres() {
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then
    say "stopping PostgreSQL"
    as_pg "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
}

stop_local() {
  stop_kafka
  stop_postgres
}
