# shellcheck shell=bash
# A second local Kafka broker that only speaks SASL_SSL with SCRAM-SHA-512: the secured cluster of
# the end-to-end test tests/e2e/secured.rs, and a place to try the KAFKA_CONFIG_* settings by hand.
# Sourced by ./dev after deploy/local/lib.sh (never run); the same Kafka jars, its own ports and
# folder, never the broker on 9092. Everything lives under .local/sasl/ (SASL_DIR):
#
#   ca.pem, ca.key            a throw-away certificate authority (openssl, made once)
#   broker.pem                the broker's private key and certificate (SAN 127.0.0.1 and localhost),
#                             signed by that CA: the broker's PEM keystore
#   client.properties         what a taskstream service needs to connect (KAFKA_CONFIG_FILE=...):
#                             security.protocol, sasl.mechanism, sasl.username, sasl.password,
#                             ssl.ca.location
#   server.properties, data/, kafka.log, kafka.pid, cluster-id, scram-passwords
#
# The SCRAM users (the broker's own, for its inter-broker listener, and "taskstream") are created when
# the storage is formatted (kafka-storage format --add-scram), with random passwords kept in
# scram-passwords; no authorizer runs, so an authenticated user may do anything.
#
# Ports: SASL_KAFKA_PORT (default 19094, the SASL_SSL listener) and SASL_KAFKA_CONTROLLER_PORT (19095,
# the KRaft controller, plain but controller requests only).
#
# Functions: start_sasl_kafka (launches it, unless it runs already; exports TASKSTREAM_SASL_BROKERS
# and TASKSTREAM_SASL_CLIENT_CONFIG), wait_sasl_kafka (until it serves), stop_sasl_kafka.
# SASL_STARTED is 1 when this shell launched it. By hand, e.g.:
#   bash -c '. deploy/local/lib.sh; . deploy/local/sasl.sh; fetch_kafka_jars; start_sasl_kafka; wait_sasl_kafka'
#   KAFKA_BROKERS=127.0.0.1:19094 KAFKA_CONFIG_FILE=.local/sasl/client.properties ./dev up

SASL_DIR="${SASL_DIR:-$LOCAL_DIR/sasl}"
SASL_KAFKA_PORT="${SASL_KAFKA_PORT:-19094}"
SASL_KAFKA_CONTROLLER_PORT="${SASL_KAFKA_CONTROLLER_PORT:-19095}"
SASL_USER=taskstream
SASL_STARTED=0
_SASL_LOG_FROM=0

sasl_pid() { # the broker this script started, if it still runs
  local pid
  [ -f "$SASL_DIR/kafka.pid" ] || return 1
  pid=$(cat "$SASL_DIR/kafka.pid")
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$SASL_DIR/server.properties" || return 1
  echo "$pid"
}

# A CA and a broker certificate signed by it (once; again when a file is missing or expires
# within a day).
sasl_certificates() {
  command -v openssl >/dev/null || apt_install openssl
  local d=$SASL_DIR
  if [ -s "$d/ca.pem" ] && [ -s "$d/broker.pem" ] && openssl x509 -checkend 86400 -noout -in "$d/broker.pem" >/dev/null 2>&1; then
    return 0
  fi
  say "generating a throw-away CA and broker certificate in $(shown "$d") (openssl)"
  rm -f "$d/ca.pem" "$d/ca.key" "$d/broker.pem" "$d/broker.key" "$d/broker.csr" "$d/ca.srl"
  (
    set -e
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=taskstream local test CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout broker.key -out broker.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >broker.ext
    openssl x509 -req -in broker.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 825 \
      -extfile broker.ext -out broker.crt
    # Kafka's PEM keystore: the (unencrypted PKCS#8) key, then the certificate chain.
    cat broker.key broker.crt ca.pem >broker.pem
    rm -f broker.key broker.csr broker.crt broker.ext ca.srl
    chmod 600 ca.key broker.pem
  ) >"$d/openssl.log" 2>&1 || { cat "$d/openssl.log" >&2; die "generating the certificates failed (openssl)"; }
}

sasl_write_config() {
  local d=$SASL_DIR broker_password
  broker_password=$(sed -n 's/^broker=//p' "$d/scram-passwords")
  {
    cat <<PROPS
# Written by deploy/local/sasl.sh on every start; edit that file instead.
# One KRaft node (Kafka $KAFKA_VERSION) whose only client listener is SASL_SSL with SCRAM-SHA-512.
node.id=1
process.roles=broker,controller
listeners=SASL_SSL://127.0.0.1:$SASL_KAFKA_PORT,CONTROLLER://127.0.0.1:$SASL_KAFKA_CONTROLLER_PORT
advertised.listeners=SASL_SSL://127.0.0.1:$SASL_KAFKA_PORT,CONTROLLER://127.0.0.1:$SASL_KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$SASL_KAFKA_CONTROLLER_PORT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$broker_password";
ssl.keystore.type=PEM
ssl.keystore.location=$d/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$d/ca.pem
ssl.client.auth=none
PROPS
    kafka_node_properties "$d"
  } >"$d/server.properties"
  chmod 600 "$d/server.properties"
  write_kafka_log4j "$d"
  cat >"$d/client.properties" <<PROPS
# Written by deploy/local/sasl.sh: a taskstream service's settings for the local SASL_SSL broker,
#   KAFKA_BROKERS=127.0.0.1:$SASL_KAFKA_PORT KAFKA_CONFIG_FILE=$(shown "$d")/client.properties
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.username=$SASL_USER
sasl.password=$(sed -n "s/^$SASL_USER=//p" "$d/scram-passwords")
ssl.ca.location=$d/ca.pem
PROPS
  chmod 600 "$d/client.properties"
}

# Formats the storage once, creating the SCRAM users (their passwords are made here, kept in
# scram-passwords); again when another Kafka version formatted it.
sasl_format_storage() {
  local d=$SASL_DIR formatted="" id
  [ -f "$d/data.version" ] && formatted=$(tr -d '[:space:]' <"$d/data.version")
  if [ -f "$d/data/meta.properties" ] && [ "$formatted" = "$KAFKA_VERSION" ] && [ -s "$d/scram-passwords" ]; then
    return 0
  fi
  rm -rf "$d/data" "$d/data.version"
  mkdir -p "$d/data"
  printf 'broker=%s\n%s=%s\n' "$(openssl rand -hex 16)" "$SASL_USER" "$(openssl rand -hex 16)" >"$d/scram-passwords"
  chmod 600 "$d/scram-passwords"
  sasl_write_config
  [ -s "$d/cluster-id" ] || kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1 >"$d/cluster-id"
  id=$(tr -d '[:space:]' <"$d/cluster-id")
  say "formatting the SASL_SSL broker's storage in $(shown "$d/data") with SCRAM-SHA-512 users broker and $SASL_USER"
  kafka_java kafka.tools.StorageTool format --standalone -t "$id" -c "$d/server.properties" \
    --add-scram "SCRAM-SHA-512=[name=broker,password=$(sed -n 's/^broker=//p' "$d/scram-passwords")]" \
    --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$(sed -n "s/^$SASL_USER=//p" "$d/scram-passwords")]" \
    >"$d/format.log" 2>&1 || { cat "$d/format.log" >&2; die "formatting the SASL_SSL broker's storage failed"; }
  echo "$KAFKA_VERSION" >"$d/data.version"
}

start_sasl_kafka() {
  export TASKSTREAM_SASL_BROKERS="127.0.0.1:$SASL_KAFKA_PORT" TASKSTREAM_SASL_CLIENT_CONFIG="$SASL_DIR/client.properties"
  mkdir -p "$SASL_DIR"
  local pid
  if pid=$(sasl_pid); then
    say "the SASL_SSL Kafka broker already runs on $TASKSTREAM_SASL_BROKERS (pid $pid, $(shown "$SASL_DIR")); reusing it"
    return 0
  fi
  if port_open "$SASL_KAFKA_PORT" || port_open "$SASL_KAFKA_CONTROLLER_PORT"; then
    die "127.0.0.1:$SASL_KAFKA_PORT or :$SASL_KAFKA_CONTROLLER_PORT (the SASL_SSL test broker's ports) is taken by another process; stop it, or set SASL_KAFKA_PORT / SASL_KAFKA_CONTROLLER_PORT"
  fi
  sasl_certificates
  sasl_format_storage
  sasl_write_config
  _SASL_LOG_FROM=0
  [ -f "$SASL_DIR/kafka.log" ] && _SASL_LOG_FROM=$(stat -c %s "$SASL_DIR/kafka.log")
  say "starting a SASL_SSL (SCRAM-SHA-512) Kafka broker on $TASKSTREAM_SASL_BROKERS (log: $(shown "$SASL_DIR")/kafka.log)"
  setsid java -Xmx512m -Xms128m -XX:+UseSerialGC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$SASL_DIR/log4j2.properties" -Dkafka.logs.dir="$SASL_DIR/logs" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$SASL_DIR/server.properties" </dev/null >"$SASL_DIR/stdout.log" 2>&1 &
  pid=$!
  disown "$pid" 2>/dev/null || true
  echo "$pid" >"$SASL_DIR/kafka.pid"
  SASL_STARTED=1
}

# Until the broker logged that it started (its listener takes TLS handshakes a moment after bind).
wait_sasl_kafka() {
  local pid t0 deadline=$((SECONDS + KAFKA_START_TIMEOUT)) log
  pid=$(sasl_pid) || die "the SASL_SSL Kafka broker is not running (log: $(shown "$SASL_DIR")/kafka.log, $(shown "$SASL_DIR")/stdout.log)"
  [ "$SASL_STARTED" = 1 ] || return 0
  t0=$(now_ms)
  log="$SASL_DIR/kafka.log"
  until port_open "$SASL_KAFKA_PORT" && tail -c +$((_SASL_LOG_FROM + 1)) "$log" 2>/dev/null | grep -q 'Kafka Server started'; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -c +$((_SASL_LOG_FROM + 1)) "$log" 2>/dev/null | grep -E -A1 '^\[[^]]*\] (ERROR|FATAL) ' | tail -n 8 >&2
      tail -n 10 "$SASL_DIR/stdout.log" >&2
      rm -f "$SASL_DIR/kafka.pid"
      SASL_STARTED=0
      die "the SASL_SSL Kafka broker exited while starting (logs: $(shown "$log"), $(shown "$SASL_DIR")/stdout.log)"
    fi
    ((SECONDS < deadline)) || die "the SASL_SSL Kafka broker did not start within $KAFKA_START_TIMEOUT s (log: $(shown "$log")); it still runs as pid $pid"
    sleep 0.2
  done
  say "the SASL_SSL Kafka broker is up on $TASKSTREAM_SASL_BROKERS (pid $pid, $(since "$t0") of waiting)"
}

stop_sasl_kafka() {
  local pid
  pid=$(sasl_pid) || { rm -f "$SASL_DIR/kafka.pid"; return 0; }
  say "stopping the SASL_SSL Kafka broker (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 60))
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      warn "it did not stop within 60 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.2
  done
  rm -f "$SASL_DIR/kafka.pid"
  SASL_STARTED=0
}
