#!/usr/bin/env bash
# Instructions per request under callgrind (valgrind): the steady measure on a noisy VM.
# For each mode, runs benches/instructions.rs with N requests, counting only inside its
# `measured` loop (callgrind --toggle-collect), and prints the count / N, and what each
# layer adds over the bare service.
#
#   bash scripts/instructions.sh          # N=20000, KEYS=1 (also try KEYS=10000)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
KEYS=${KEYS:-1}
command -v valgrind >/dev/null || {
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind) >/dev/null
}
bin=$(cargo bench --bench instructions --no-run 2>&1 | sed -n 's/.*Executable benches\/instructions.rs (\(.*\))/\1/p' | tail -1)
count() {
  valgrind --tool=callgrind --toggle-collect='instructions::measured*' \
    --callgrind-out-file=/dev/null "$bin" "$1" "$2" "$KEYS" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
declare -A per
for mode in bare x-api-key bearer stack governor; do
  many=$(count "$N" "$mode")
  [ -n "$many" ] && [ "$many" -gt 0 ] || { echo "no count for $mode" >&2; exit 1; }
  per[$mode]=$(( many / N ))
  printf '%-10s %7d instructions/request\n' "$mode" "${per[$mode]}"
done
echo "keys: $KEYS"
for mode in x-api-key bearer stack governor; do
  printf '%-10s adds %6d over the bare service\n' "$mode" $(( per[$mode] - per[bare] ))
done
