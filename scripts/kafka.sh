#!/usr/bin/env bash
# A real single-node Apache Kafka (4.x, KRaft mode) on 127.0.0.1, for the tests
# and the tutorial. Its jars come from Maven Central through the machine's Maven
# and are cached in $CAIRN_KAFKA_HOME (default ~/.cache/cairn-kafka).
#
#   scripts/kafka.sh start    # fetch if needed, format, start, wait until it answers
#   scripts/kafka.sh stop     # stop it (by PID)
#   scripts/kafka.sh reset    # stop it and delete its data (topics, groups), keeping the jars
#   scripts/kafka.sh status   # running or not
#
# The broker listens on 127.0.0.1:${KAFKA_PORT:-9092} (controller on the next port),
# and with SASL_PLAINTEXT / PLAIN on KAFKA_PORT + 100 (user "cairn", password
# "cairn-secret"), for the tests of authenticated clusters.
#
# Cluster mode: three KRaft nodes (each broker and controller) with replication
# factor 3 and min.insync.replicas=2, for the tests that lose a broker:
#
#   scripts/kafka.sh cluster start       # nodes 1-3 on 127.0.0.1:$KAFKA_PORT, +2, +4
#   scripts/kafka.sh cluster kill N      # SIGKILL node N (1-3)
#   scripts/kafka.sh cluster start-node N  # start node N again
#   scripts/kafka.sh cluster stop|status
#
# In cluster mode KAFKA_PORT defaults to 19092 (controllers on the odd ports).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
home="${CAIRN_KAFKA_HOME:-$HOME/.cache/cairn-kafka}"
port="${KAFKA_PORT:-9092}"
controller=$((port + 1))
lib="$home/lib"
data="$home/data-$port"
pidfile="$home/kafka-$port.pid"
log="$home/kafka-$port.log"
props="$home/server-$port.properties"

fetch() {
  if [ -f "$lib/.complete" ]; then return; fi
  command -v mvn >/dev/null || { echo "kafka.sh: Maven (mvn) is required to fetch Kafka's jars" >&2; exit 1; }
  command -v java >/dev/null || { echo "kafka.sh: Java 17+ is required to run Kafka" >&2; exit 1; }
  mkdir -p "$lib"
  echo "kafka.sh: fetching Apache Kafka's jars through Maven into $lib" >&2
  mvn -q -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$lib" -DincludeScope=runtime >&2
  touch "$lib/.complete"
}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

java_cmd() {
  cat > "$home/log4j2.properties" <<'LOG'
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
LOG
  java=(java -Xms256m -Xmx512m -XX:+UseG1GC -Dlog4j2.configurationFile="$home/log4j2.properties" -cp "$lib/*")
}

# The properties of a node: $1 node id, $2 replication factor, $3 min ISR,
# $4 the controller quorum setting line.
properties() {
  cat <<PROPS
process.roles=broker,controller
node.id=$1
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller,SASL_PLAINTEXT://127.0.0.1:$((port + 100))
advertised.listeners=PLAINTEXT://127.0.0.1:$port,SASL_PLAINTEXT://127.0.0.1:$((port + 100))
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
inter.broker.listener.name=PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="cairn" password="cairn-secret" user_cairn="cairn-secret";
$4
log.dirs=$data/logs
num.partitions=4
default.replication.factor=$2
min.insync.replicas=$3
offsets.topic.replication.factor=$2
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$2
transaction.state.log.min.isr=$3
share.coordinator.state.topic.replication.factor=$2
share.coordinator.state.topic.min.isr=$3
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# A dead broker is noticed by the controllers in 3 s (default 9 s), so its
# partitions' leaders and its group coordinators move well within a Cairn
# cluster's 6 s session timeout.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
PROPS
}

# Start the node whose port, data, pid and log are set; $1: format arguments.
launch() {
  local java; java_cmd
  if [ ! -f "$data/logs/meta.properties" ]; then
    "${java[@]}" kafka.tools.StorageTool format $1 -c "$props" >"$log" 2>&1
  fi
  nohup "${java[@]}" kafka.Kafka "$props" >>"$log" 2>&1 &
  echo $! >"$pidfile"
}

# Wait until the node answers on its port.
await_node() {
  for _ in $(seq 1 120); do
    if answers; then echo "kafka.sh: broker up on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return; fi
    running || { echo "kafka.sh: the broker exited; see $log" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.5
  done
  echo "kafka.sh: the broker did not answer on 127.0.0.1:$port in 60 s; see $log" >&2
  exit 1
}

start() {
  if running; then echo "kafka.sh: already running (pid $(cat "$pidfile"))"; return; fi
  fetch
  mkdir -p "$data"
  properties 1 1 1 "controller.quorum.bootstrap.servers=127.0.0.1:$controller" >"$props"
  local java; java_cmd
  launch "--standalone -t $("${java[@]}" kafka.tools.StorageTool random-uuid)"
  await_node
}

stop() {
  if running; then
    local pid; pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    echo "kafka.sh: stopped"
  fi
  rm -f "$pidfile"
}

# ----- cluster mode -----
base="${KAFKA_PORT:-19092}"

# Point port, controller, data, pidfile and log at node $1 of the cluster.
node() {
  port=$((base + 2 * ($1 - 1)))
  controller=$((port + 1))
  data="$home/cluster-$base/node-$1"
  pidfile="$home/cluster-$base/node-$1.pid"
  log="$home/cluster-$base/node-$1.log"
  props="$home/cluster-$base/node-$1.properties"
}

voters() {
  local v=() n
  for n in 1 2 3; do v+=("$n@127.0.0.1:$((base + 2 * (n - 1) + 1))"); done
  (IFS=,; echo "controller.quorum.voters=${v[*]}")
}

start_node() {
  node "$1"
  if running; then return; fi
  mkdir -p "$data"
  properties "$1" 3 2 "$(voters)" >"$props"
  launch "-t $(cat "$home/cluster-$base/cluster-id")"
}

cluster() {
  case "${1:-}" in
    start)
      fetch
      mkdir -p "$home/cluster-$base"
      if [ ! -f "$home/cluster-$base/cluster-id" ]; then
        local java; java_cmd
        "${java[@]}" kafka.tools.StorageTool random-uuid >"$home/cluster-$base/cluster-id"
      fi
      for n in 1 2 3; do start_node "$n"; done
      for n in 1 2 3; do node "$n"; await_node; done ;;
    start-node) start_node "${2:?node 1-3}"; await_node ;;
    kill)
      node "${2:?node 1-3}"
      if running; then kill -9 "$(cat "$pidfile")"; echo "kafka.sh: node $2 killed"; fi
      rm -f "$pidfile" ;;
    stop)
      for n in 1 2 3; do node "$n"; stop; done
      rm -rf "$home/cluster-$base" ;;
    status)
      local up=0
      for n in 1 2 3; do node "$n"; if running; then up=$((up + 1)); echo "node $n running (127.0.0.1:$port)"; else echo "node $n stopped"; fi; done
      [ "$up" -eq 3 ] ;;
    *) echo "usage: $0 cluster start|start-node N|kill N|stop|status" >&2; exit 2 ;;
  esac
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  reset) stop; rm -rf "$data" ;;
  status) if running; then echo "running (pid $(cat "$pidfile"), 127.0.0.1:$port)"; else echo "stopped"; exit 1; fi ;;
  cluster) shift; cluster "$@" ;;
  *) echo "usage: $0 start|stop|status|cluster ..." >&2; exit 2 ;;
esac
