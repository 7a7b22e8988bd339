# Sourced by the scripts that test a running quickstart (schemathesis.sh, oauth-clients.sh):
# `start_quickstart` builds the example, starts it on a scratch SQLite file and a free
# loopback port, waits for `listening on`, and sets `url`, `work` (its directory, with the
# quickstart's stdout in `$work/out` and stderr in `$work/err`) and `value NAME` (a
# `NAME=value` line it printed). It stops the quickstart and removes `$work` on exit.
# Expects `target` (the cargo target directory).

start_quickstart() {
  cargo build -q --example quickstart
  local quickstart=$target/debug/examples/quickstart
  work=$(mktemp -d)
  pid=
  trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
  KEYGATE_ADDR=127.0.0.1:0 KEYGATE_DATABASE_URL="sqlite://$work/keygate.db" \
    "$quickstart" >"$work/out" 2>"$work/err" &
  pid=$!
  for _ in $(seq 300); do
    grep -q '^listening on http://' "$work/out" 2>/dev/null && break
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "the quickstart stopped:" >&2; cat "$work/err" >&2; exit 1
    fi
    sleep 0.1
  done
  url=$(sed -n 's/^listening on \(http:\/\/[^ ]*\).*/\1/p' "$work/out" | head -1)
  [ -n "$url" ] || { echo "the quickstart did not say where it listens" >&2; cat "$work/err" >&2; exit 1; }
}

value() { sed -n "s/^$1=//p" "$work/out" | head -1; }
