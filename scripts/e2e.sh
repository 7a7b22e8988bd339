#!/usr/bin/env bash
# End-to-end load: a bare axum server against the same server behind the full keygate
# stack and behind tower_governor (the peer, keyed by the same header), on loopback, with wrk. Release build; server pinned to core 0 and wrk to core 1
# where taskset exists. Reports requests/s and, the steadier figure on a small machine,
# the server's CPU time per request (utime + stime from /proc/PID/stat over the run).
#
# Mode `redis` puts the buckets on Redis (KEYGATE_REDIS_URL, default the local one) and
# reports Redis's script calls per request (INFO commandstats: evalsha + eval).
#
#   bash scripts/e2e.sh            # DURATION=10 CONNECTIONS=32 ROUNDS=3 by default
#   MODES="bare stack redis" bash scripts/e2e.sh
#   LOADTEST=/tmp/loadtest-old MODES=redis bash scripts/e2e.sh   # another build of the server
set -euo pipefail
if [ -n "${LOADTEST:-}" ]; then
  LOADTEST=$(realpath "$LOADTEST") # before the cd below
fi
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-3901}

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi
if [ -z "${LOADTEST:-}" ]; then
  cargo build --release --example loadtest >&2
  LOADTEST=target/release/examples/loadtest
fi

if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  server_cpu=(taskset -c 0); load_cpu=(taskset -c 1)
else
  server_cpu=(); load_cpu=()
fi
ticks=$(getconf CLK_TCK)

script_calls() { # EVALSHA + EVAL calls Redis has served so far
  redis-cli -u "${KEYGATE_REDIS_URL:-redis://127.0.0.1:6379/}" info commandstats 2>/dev/null \
    | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_eval(sha)?:/ { n += $3 } END { print n + 0 }'
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run() { # mode -> prints "requests cpu_seconds"
  local mode=$1 out key pid before after requests
  out=$(mktemp)
  # taskset execs the server, so $! is the server's own PID.
  KEYGATE_MODE=$mode KEYGATE_ADDR=127.0.0.1:$PORT "${server_cpu[@]}" "$LOADTEST" >"$out" &
  pid=$!
  for _ in $(seq 100); do grep -q '^listening' "$out" && break; sleep 0.1; done
  grep -q '^listening' "$out" || { echo "the $mode server did not start" >&2; kill "$pid" 2>/dev/null; exit 1; }
  key=$(sed -n 's/^KEY=//p' "$out")
  # Warm up, then measure.
  "${load_cpu[@]}" wrk -t1 -c"$CONNECTIONS" -d2s -H "X-API-KEY: $key" "http://127.0.0.1:$PORT/v1/health" >/dev/null
  before=$(cpu_ticks "$pid")
  calls_before=$(script_calls)
  requests=$("${load_cpu[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -H "X-API-KEY: $key" \
    "http://127.0.0.1:$PORT/v1/health" | awk '/requests in/ {print $1}')
  after=$(cpu_ticks "$pid")
  calls_after=$(script_calls)
  if [ "$mode" = redis ]; then
    awk -v c=$(( calls_after - calls_before )) -v n="$requests" \
      'BEGIN { printf "          redis: %d script calls for %d requests = %.3f per request\n", c, n, c / n }' >&2
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$out"
  echo "$requests $(( after - before ))"
}

printf '%-6s %-9s %12s %10s %16s\n' round mode requests req/s "cpu µs/request"
declare -A total_req total_cpu
for round in $(seq "$ROUNDS"); do
  for mode in ${MODES:-bare stack governor}; do
    read -r requests cpu <<<"$(run "$mode")"
    total_req[$mode]=$(( ${total_req[$mode]:-0} + requests ))
    total_cpu[$mode]=$(( ${total_cpu[$mode]:-0} + cpu ))
    awk -v r="$round" -v m="$mode" -v n="$requests" -v c="$cpu" -v t="$ticks" -v d="$DURATION" \
      'BEGIN { printf "%-6s %-9s %12d %10.0f %16.2f\n", r, m, n, n / d, c / t / n * 1e6 }'
  done
done
if [ -z "${total_req[bare]:-}" ]; then
  exit 0 # no bare server in this run: nothing to compare against
fi
bare_cpu=$(awk -v r="${total_req[bare]}" -v c="${total_cpu[bare]}" -v t="$ticks" 'BEGIN { print c / t / r * 1e6 }')
echo
echo "all rounds (ratios against bare, measured in the same run):"
for mode in ${MODES:-bare stack governor}; do
  awk -v m="$mode" -v r="${total_req[$mode]}" -v c="${total_cpu[$mode]}" -v t="$ticks" \
    -v br="${total_req[bare]}" -v b="$bare_cpu" 'BEGIN {
      s = c / t / r * 1e6;
      printf "%-9s %8.2f µs CPU/request  CPU ratio %.3f  throughput ratio %.3f\n", m, s, s / b, r / br
    }'
done
