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
# PIPELINE (extra `[pipeline]` settings, e.g. PIPELINE="workers = 4; batch_max_wait_ms = 10"),
# MIX (gt06=50,teltonika=50: protocol shares of the throughput step), RECORDS_PER_PACKET (1; throughput step: fixes each simulated device batches into one
# Teltonika AVL packet / one write of GT06 locations, as real tags do, e.g. 20).
# Step "loaded_latency" (not in the default STEPS): fix→alert latency at LOAD_RATE (49000)
# background fixes/s from LOAD_DEVICES (2000) Teltonika tags plus 1,000/s alerting devices.
# Step "connections" (not in the default STEPS): CONNS (100000) idle GT06 devices held at once
# by INSTANCES (6) em processes sharing the port with `listeners.reuse_port` — one process can
# hold at most `ulimit -Hn` sockets (20,000 on the machines here, not raisable without
# CAP_SYS_RESOURCE) — driven by as many simulator processes from 127.0.0.2–127.0.0.61.
set -euo pipefail
cd "$(dirname "$0")/.."

DB_URL=${DB_URL:-postgres://postgres@127.0.0.1:5432/test}
MQTT_URL=${MQTT_URL:-mqtt://127.0.0.1:1883}
RATES=${RATES:-"2000 5000 10000 20000"}
DURATION=${DURATION:-25}
DEVICES=${DEVICES:-2000}
IDLE_CONNS=${IDLE_CONNS:-18000}
CONNS=${CONNS:-100000}
INSTANCES=${INSTANCES:-6}
STEPS=${STEPS:-"throughput latency idle"}
SCHEMA=${SCHEMA:-em_load_$(date +%s)}
BASE=${PORT_BASE:-25000}
GT06=127.0.0.1:$((BASE + 23)); TELT=127.0.0.1:$((BASE + 27)); METRICS=127.0.0.1:$((BASE + 64))
WORK=$(mktemp -d /tmp/em-load.XXXXXX)

# The service and the simulator each need one descriptor per connection.
ulimit -n "$(ulimit -Hn)" || true

if [[ -z ${SKIP_BUILD:-} ]]; then cargo build --release -p em-ingest -p em-sim --bins; fi
EM=${EM:-target/release/em}; SIM=${SIM:-target/release/em-sim}

# em_config <metrics port> <dashboard port> <extra [listeners] lines> <mqtt enabled>
em_config() {
cat <<TOML
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
$3
[mqtt]
enabled = $4
url = "$MQTT_URL"
client_id = "em-load-$SCHEMA-$1"
publish_alerts = $4
[metrics]
bind = "127.0.0.1:$1"
[log]
filter = "warn"
[demo]
enabled = false
[dashboard]
bind = "127.0.0.1:$2"
[retention]
enabled = false
[pipeline]
$(tr ';' '\n' <<<"${PIPELINE:-}")
TOML
}
em_config $((BASE + 64)) $((BASE + 80)) "" true > "$WORK/em.toml"
# em-sim --register takes the schema from the URL's search path for PostgreSQL.
REG_URL=$DB_URL
if [[ $DB_URL == postgres* ]]; then
  sep='?'; [[ $DB_URL == *\?* ]] && sep='&'
  REG_URL="${DB_URL}${sep}options=-c%20search_path%3D${SCHEMA},public"
fi

EM_PID=
cleanup() {
  [[ -n $EM_PID ]] && kill "$EM_PID" 2>/dev/null && wait "$EM_PID" 2>/dev/null
  # Whatever else this script started (instances and simulators of the connections step).
  local left; left=$(jobs -p); [[ -n $left ]] && kill $left 2>/dev/null; wait 2>/dev/null
  # Keep the logs and the last metrics scrape for a look after the run.
  mkdir -p /tmp/em-load-last && cp "$WORK"/*.log "$WORK"/*.prom /tmp/em-load-last/ 2>/dev/null
  rm -rf "$WORK"
}
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

# Rows really stored (PostgreSQL): a GT06 fix has a 1-second time stamp and its identity is
# (device, time), so a GT06 device reporting faster than once a second is stored once per
# second — acked reports above that are duplicates by design, not fixes.
stored_rows() {
  if [[ $DB_URL == postgres* ]]; then
    psql "$DB_URL" -Atc "SELECT count(*) FROM $SCHEMA.positions" 2>/dev/null || echo 0
  else echo 0; fi
}
if [[ " $STEPS " == *" throughput "* ]]; then
  echo "(throughput: MIX=${MIX:-gt06=50,teltonika=50}, ${RECORDS_PER_PACKET:-1} records per packet)"
  for r in $RATES; do
    rows0=$(stored_rows); t0=$(date +%s.%N)
    $SIM --gt06 $GT06 --teltonika $TELT --mix "${MIX:-gt06=50,teltonika=50}" --devices "$DEVICES" \
         --rate "$r" --duration "$DURATION" --no-alert-feed --share-leave-home 0 \
         --share-strap-cut 0 --share-battery-drain 0 --share-go-silent 0 \
         --connect-concurrency 512 --ramp-up 2 --records-per-packet "${RECORDS_PER_PACKET:-1}" \
         --json --quiet >"$WORK/t$r.json"
    rows1=$(stored_rows); t1=$(date +%s.%N)
    row "rate=$r" "$WORK/t$r.json"
    echo "  rows stored in PostgreSQL: $((rows1 - rows0)) in $(printf %.1f "$(echo "$t1 - $t0" | bc)") s of simulator run" \
         "(incl. connect/ramp): $(printf %.0f "$(echo "($rows1 - $rows0) / $(jq .elapsed_secs "$WORK/t$r.json")" | bc -l)") rows/s over the simulator's measured duration"
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

if [[ " $STEPS " == *" loaded_latency "* ]]; then
  # Fix→alert latency while the service is under load: LOAD_RATE fixes/s from LOAD_DEVICES
  # Teltonika tags (with subjects, zones and curfews: every fix is evaluated) plus the alerting
  # fleet of the latency step at 1,000/s.
  LOAD_RATE=${LOAD_RATE:-49000}; LOAD_DEVICES=${LOAD_DEVICES:-2000}; lfirst=500000
  $SIM --teltonika $TELT --mix teltonika=1 --devices "$LOAD_DEVICES" --first-index $lfirst \
       --register "$REG_URL" --register-subjects --register-only
  $SIM --teltonika $TELT --mix teltonika=1 --devices "$LOAD_DEVICES" --first-index $lfirst \
       --rate "$LOAD_RATE" --duration 50 --no-alert-feed --share-leave-home 0 \
       --share-strap-cut 0 --share-battery-drain 0 --share-go-silent 0 \
       --connect-concurrency 512 --ramp-up 2 --records-per-packet "${RECORDS_PER_PACKET:-20}" \
       --json --quiet >"$WORK/load.json" & LOAD_PID=$!
  sleep 5
  $SIM --gt06 $GT06 --teltonika $TELT --mqtt "$MQTT_URL" --mix gt06=50,teltonika=50 \
       --devices "$DEVICES" --rate 1000 --duration 40 --misbehave-after 5 \
       --seed 7 ${ALERT_SIM_ARGS:---share-leave-home 0.05 --share-strap-cut 0.05} \
       --json --quiet >"$WORK/llat.json"
  curl -s "http://$METRICS/metrics" >"$WORK/loaded.prom" || true
  wait "$LOAD_PID" || true
  row "load@$LOAD_RATE/s" "$WORK/load.json"
  row "alerts@1000/s+load" "$WORK/llat.json"
fi

if [[ " $STEPS " == *" idle "* ]]; then
  gauge() { curl -s "http://$METRICS/metrics" | awk '/^em_connections_(open|active)\{protocol="gt06"\}/{print $2}' | head -1; }
  before=$(rss_kib "$EM_PID")
  $SIM --gt06 $GT06 --mix gt06=1 --devices "$IDLE_CONNS" --first-index "$DEVICES" \
       --interval 3600 --duration 85 --ramp-up 50 --connect-concurrency 512 \
       --source-ips 127.0.0.2-127.0.0.9 --no-alert-feed --share-leave-home 0 \
       --share-strap-cut 0 --share-battery-drain 0 --share-go-silent 0 \
       --json --quiet >"$WORK/idle.json" &
  SIM_PID=$!
  # Two samples during the ramp: the slope between them is the cost of one more idle
  # connection, without the one-off growth (buffers, pools) of the first thousands.
  sleep 22; c1=$(gauge); r1=$(rss_kib "$EM_PID")
  sleep 48; conns=$(gauge); after=$(rss_kib "$EM_PID")
  wait "$SIM_PID"
  row "idle" "$WORK/idle.json"
  opened=$(jq .connections_opened "$WORK/idle.json")
  n=${conns:-$opened}; n=${n%.*}; c1=${c1%.*}
  echo "idle connections: service gauge ${conns:-?}, simulator opened $opened"
  echo "service RSS before ${before} KiB, with $n idle connections ${after} KiB:" \
       "$(( (after - before) * 1024 / (n > 0 ? n : 1) )) bytes per idle connection (all in)"
  echo "marginal: ${c1} → ${n} connections, RSS ${r1} → ${after} KiB:" \
       "$(( (after - r1) * 1024 / (n - c1 > 0 ? n - c1 : 1) )) bytes per additional idle connection"
fi

if [[ " $STEPS " == *" connections "* ]]; then
  # Devices DEVICES.. are registered here (after the idle step's range).
  first=$((DEVICES + IDLE_CONNS))
  $SIM --gt06 $GT06 --devices "$CONNS" --first-index "$first" --register "$REG_URL" --register-only
  stop_em
  PIDS=()
  for i in $(seq 1 "$INSTANCES"); do
    em_config $((BASE + 100 + i)) $((BASE + 200 + i)) "reuse_port = true" false > "$WORK/em$i.toml"
    "$EM" run --config "$WORK/em$i.toml" >"$WORK/em$i.log" 2>&1 & PIDS+=($!)
  done
  for i in $(seq 1 "$INSTANCES"); do
    for _ in $(seq 1 200); do
      curl -sf "http://127.0.0.1:$((BASE + 100 + i))/metrics" >/dev/null 2>&1 && break; sleep 0.3
    done
  done
  before=0; for p in "${PIDS[@]}"; do before=$((before + $(rss_kib "$p"))); done
  per=$(( (CONNS + INSTANCES - 1) / INSTANCES )); SIMS=()
  for i in $(seq 0 $((INSTANCES - 1))); do
    n=$(( CONNS - i * per < per ? CONNS - i * per : per ))
    $SIM --gt06 $GT06 --mix gt06=1 --devices "$n" --first-index $((first + i * per)) \
         --interval 3600 --duration 150 --ramp-up 90 --connect-concurrency 256 \
         --source-ips "127.0.$((i + 1)).2-127.0.$((i + 1)).11" --no-alert-feed --share-leave-home 0 \
         --share-strap-cut 0 --share-battery-drain 0 --share-go-silent 0 \
         --json --quiet >"$WORK/conn$i.json" & SIMS+=($!)
  done
  sleep 125
  held=0; for i in $(seq 1 "$INSTANCES"); do
    g=$(curl -s "http://127.0.0.1:$((BASE + 100 + i))/metrics" | awk '/^em_connections_(open|active)\{protocol="gt06"\}/{print $2}' | head -1)
    echo "instance $i: ${g:-?} connections, RSS $(rss_kib "${PIDS[$((i - 1))]}") KiB"
    held=$((held + ${g%.*}))
  done
  after=0; for p in "${PIDS[@]}"; do after=$((after + $(rss_kib "$p"))); done
  established=$(ss -Htn state established "( sport = :$((BASE + 23)) )" | wc -l)
  wait "${SIMS[@]}" || true
  for i in $(seq 0 $((INSTANCES - 1))); do row "conns[$i]" "$WORK/conn$i.json"; done
  kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null || true
  echo "connections held at once: $held (service gauges), $established established on the port (ss)"
  echo "$INSTANCES services' RSS before $before KiB, with $held idle connections $after KiB:" \
       "$(( (after - before) * 1024 / (held > 0 ? held : 1) )) bytes per idle connection"
fi
echo "== done (schema $SCHEMA left in the database for inspection)"
