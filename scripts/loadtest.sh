#!/usr/bin/env bash
# Load test of the EM service (GitHub issue #4): throughput into PostgreSQL, fix→alert latency,
# idle connections and memory per idle connection. Loopback only (127.0.0.x); every step is
# bounded by --duration; everything started here is stopped on exit.
#
#   scripts/loadtest.sh                       # all steps, PostgreSQL
#   STEPS="throughput" RATES="2000 5000" scripts/loadtest.sh
#   DB_URL=sqlite:///tmp/em_load.db STEPS=throughput scripts/loadtest.sh   # SQLite baseline
#
# Environment: DB_URL (postgres://postgres@127.0.0.1:5432/test), MQTT_URL
# (mqtt://127.0.0.1:1883), RATES ("2000 5000 10000 20000"), DURATION (25 s per rate),
# DEVICES (2000 active devices), IDLE_CONNS (18000; the service needs one fd per connection,
# so keep it below `ulimit -n`), STEPS ("throughput latency idle"), SKIP_BUILD=1,
# PIPELINE (extra `[pipeline]` settings, e.g. PIPELINE="workers = 4; batch_max_wait_ms = 10").
set -euo pipefail
cd "$(dirname "$0")/.."

DB_URL=${DB_URL:-postgres://postgres@127.0.0.1:5432/test}
MQTT_URL=${MQTT_URL:-mqtt://127.0.0.1:1883}
RATES=${RATES:-"2000 5000 10000 20000"}
DURATION=${DURATION:-25}
DEVICES=${DEVICES:-2000}
IDLE_CONNS=${IDLE_CONNS:-18000}
STEPS=${STEPS:-"throughput latency idle"}
SCHEMA=${SCHEMA:-em_load_$(date +%s)}
BASE=${PORT_BASE:-25000}
GT06=127.0.0.1:$((BASE + 23)); TELT=127.0.0.1:$((BASE + 27)); METRICS=127.0.0.1:$((BASE + 64))
WORK=$(mktemp -d /tmp/em-load.XXXXXX)

# The service and the simulator each need one descriptor per connection.
ulimit -n "$(ulimit -Hn)" || true

if [[ -z ${SKIP_BUILD:-} ]]; then cargo build --release -p em-ingest --bins; fi
EM=${EM:-target/release/em}; SIM=${SIM:-target/release/em-sim}

cat > "$WORK/em.toml" <<TOML
[database]
url = "$DB_URL"
$( [[ $DB_URL == postgres* ]] && echo "schema = \"$SCHEMA\"" )
[listeners]
bind = "127.0.0.1"
gt06_port = $((BASE + 23))
teltonika_port = $((BASE + 27))
h02_port = 0
osmand_port = 0
max_connections_per_ip = 0
max_connections = 0
[mqtt]
url = "$MQTT_URL"
client_id = "em-load-$SCHEMA"
publish_alerts = true
[metrics]
bind = "$METRICS"
[log]
filter = "warn"
[demo]
enabled = false
[dashboard]
bind = "127.0.0.1:$((BASE + 80))"
[retention]
enabled = false
[pipeline]
$(tr ';' '\n' <<<"${PIPELINE:-}")
TOML
# em-sim --register takes the schema from the URL's search path for PostgreSQL.
REG_URL=$DB_URL
if [[ $DB_URL == postgres* ]]; then
  sep='?'; [[ $DB_URL == *\?* ]] && sep='&'
  REG_URL="${DB_URL}${sep}options=-c%20search_path%3D${SCHEMA},public"
fi

EM_PID=
cleanup() { [[ -n $EM_PID ]] && kill "$EM_PID" 2>/dev/null && wait "$EM_PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

start_em() {
  "$EM" run --config "$WORK/em.toml" >"$WORK/em.log" 2>&1 & EM_PID=$!
  for _ in $(seq 1 100); do
    if curl -sf "http://$METRICS/metrics" >/dev/null 2>&1; then return 0; fi
    kill -0 "$EM_PID" 2>/dev/null || { cat "$WORK/em.log"; exit 1; }
    sleep 0.3
  done
  echo "service did not start"; cat "$WORK/em.log"; exit 1
}
stop_em() { kill "$EM_PID"; wait "$EM_PID" 2>/dev/null || true; EM_PID=; }
rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

echo "== schema $SCHEMA, $(nproc) cores; service, database and simulator share them"
# The service creates the schema and runs the migrations; then register the fleet.
start_em; stop_em
$SIM --gt06 $GT06 --teltonika $TELT --devices "$DEVICES" --register "$REG_URL" \
     --register-subjects --register-only
if [[ " $STEPS " == *" idle "* ]]; then
  $SIM --gt06 $GT06 --devices "$IDLE_CONNS" --first-index "$DEVICES" --register "$REG_URL" \
       --register-only
fi
start_em

row() { jq -r --arg l "$1" '[$l, .devices, (.sent_per_sec|floor), (.acked_per_sec|floor),
  .reports_sent, .reports_acked, .ack_timeouts, .ack_latency.p50_ms, .ack_latency.p99_ms,
  (.alert_latency.p50_ms // "-"), (.alert_latency.p99_ms // "-"), (.alert_latency.count // 0)]
  | @tsv' "$2"; }
echo -e "step\tdevices\tsent/s\tacked/s\tsent\tacked\ttimeouts\tack_p50_ms\tack_p99_ms\talert_p50_ms\talert_p99_ms\talerts"

if [[ " $STEPS " == *" throughput "* ]]; then
  for r in $RATES; do
    $SIM --gt06 $GT06 --teltonika $TELT --mix gt06=50,teltonika=50 --devices "$DEVICES" \
         --rate "$r" --duration "$DURATION" --no-alert-feed --share-leave-home 0 \
         --share-strap-cut 0 --share-battery-drain 0 --share-go-silent 0 \
         --connect-concurrency 512 --ramp-up 2 --json --quiet >"$WORK/t$r.json"
    row "rate=$r" "$WORK/t$r.json"
  done
fi

if [[ " $STEPS " == *" latency "* ]]; then
  # Subjects leave home under curfew / cut straps: alerts on em/v1/alerts/# (Mosquitto).
  $SIM --gt06 $GT06 --teltonika $TELT --mqtt "$MQTT_URL" --mix gt06=50,teltonika=50 \
       --devices "$DEVICES" --rate 1000 --duration 40 --misbehave-after 5 \
       --share-leave-home 0.05 --share-strap-cut 0.05 --seed 7 \
       --json --quiet >"$WORK/lat.json"
  row "alerts@1000/s" "$WORK/lat.json"
fi

if [[ " $STEPS " == *" idle "* ]]; then
  before=$(rss_kib "$EM_PID")
  $SIM --gt06 $GT06 --mix gt06=1 --devices "$IDLE_CONNS" --first-index "$DEVICES" \
       --interval 3600 --duration 70 --ramp-up 25 --connect-concurrency 512 \
       --source-ips 127.0.0.2-127.0.0.9 --no-alert-feed --share-leave-home 0 \
       --share-strap-cut 0 --share-battery-drain 0 --share-go-silent 0 \
       --json --quiet >"$WORK/idle.json" &
  SIM_PID=$!
  sleep 55
  conns=$(curl -s "http://$METRICS/metrics" | awk '/^em_connections_open\{protocol="gt06"\}|^em_connections_active\{protocol="gt06"\}/{print $2}' | head -1)
  after=$(rss_kib "$EM_PID")
  wait "$SIM_PID"
  row "idle" "$WORK/idle.json"
  opened=$(jq .connections_opened "$WORK/idle.json")
  n=${conns:-$opened}; n=${n%.*}
  echo "idle connections: service gauge ${conns:-?}, simulator opened $opened"
  echo "service RSS before ${before} KiB, with $n idle connections ${after} KiB:" \
       "$(( (after - before) * 1024 / (n > 0 ? n : 1) )) bytes per idle connection"
fi
echo "== done (schema $SCHEMA left in the database for inspection)"
