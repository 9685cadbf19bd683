#!/usr/bin/env bash
# A real single-node Apache Kafka (4.x, KRaft mode) on 127.0.0.1, for the tests
# and the tutorial. Its jars come from Maven Central through the machine's Maven
# and are cached in $CAIRN_KAFKA_HOME (default ~/.cache/cairn-kafka).
#
#   scripts/kafka.sh start    # fetch if needed, format, start, wait until it answers
#   scripts/kafka.sh stop     # stop it (by PID)
#   scripts/kafka.sh status   # running or not
#
# The broker listens on 127.0.0.1:${KAFKA_PORT:-9092} (controller on the next port).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
home="${CAIRN_KAFKA_HOME:-$HOME/.cache/cairn-kafka}"
port="${KAFKA_PORT:-9092}"
controller=$((port + 1))
lib="$home/lib"
data="$home/data-$port"
pidfile="$home/kafka-$port.pid"
log="$home/kafka-$port.log"

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

start() {
  if running; then echo "kafka.sh: already running (pid $(cat "$pidfile"))"; return; fi
  fetch
  mkdir -p "$data"
  cat > "$home/server-$port.properties" <<PROPS
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$controller
log.dirs=$data/logs
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
PROPS
  cat > "$home/log4j2.properties" <<'LOG'
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
LOG
  local java=(java -Xms256m -Xmx512m -XX:+UseG1GC -Dlog4j2.configurationFile="$home/log4j2.properties" -cp "$lib/*")
  if [ ! -f "$data/logs/meta.properties" ]; then
    "${java[@]}" kafka.tools.StorageTool format --standalone \
      -t "$("${java[@]}" kafka.tools.StorageTool random-uuid)" \
      -c "$home/server-$port.properties" >"$log" 2>&1
  fi
  nohup "${java[@]}" kafka.Kafka "$home/server-$port.properties" >>"$log" 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 1 120); do
    if answers; then echo "kafka.sh: broker up on 127.0.0.1:$port (pid $(cat "$pidfile"))"; return; fi
    running || { echo "kafka.sh: the broker exited; see $log" >&2; tail -20 "$log" >&2; exit 1; }
    sleep 0.5
  done
  echo "kafka.sh: the broker did not answer on 127.0.0.1:$port in 60 s; see $log" >&2
  exit 1
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

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if running; then echo "running (pid $(cat "$pidfile"), 127.0.0.1:$port)"; else echo "stopped"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
