#!/usr/bin/env bash
# Starts a 3-master Redis Cluster on free loopback ports (no persistence) and prints
# KEYGATE_TEST_REDIS_CLUSTER=redis://127.0.0.1:P1,redis://127.0.0.1:P2,redis://127.0.0.1:P3.
# `bash scripts/redis-cluster.sh stop DIR` stops one started earlier (DIR is printed as
# KEYGATE_REDIS_CLUSTER_DIR=).
set -euo pipefail

if [ "${1:-}" = "stop" ]; then
  for pidfile in "$2"/*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  exit 0
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

dir=$(mktemp -d /tmp/keygate-redis-cluster.XXXXXX)
nodes=()
for i in 1 2 3; do
  # A cluster node also listens on port + 10000: both must be free.
  while :; do
    port=$(free_port)
    if [ "$port" -lt 55000 ] && ! (exec 3<>"/dev/tcp/127.0.0.1/$((port + 10000))") 2>/dev/null; then
      break
    fi
  done
  mkdir -p "$dir/$port"
  (cd "$dir/$port" && redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file nodes.conf --save "" --appendonly no --daemonize yes \
    --pidfile "$dir/$port.pid" --logfile "$dir/$port.log")
  nodes+=("127.0.0.1:$port")
done
for node in "${nodes[@]}"; do
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p "${node#*:}" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 \
  || { cat "$dir/create.log" >&2; exit 1; }
for _ in $(seq 100); do
  state=$(redis-cli -p "${nodes[0]#*:}" cluster info | tr -d '\r' | sed -n 's/^cluster_state://p')
  [ "$state" = "ok" ] && break
  sleep 0.1
done
[ "$state" = "ok" ] || { echo "the cluster did not become ok" >&2; exit 1; }
urls=$(printf 'redis://%s,' "${nodes[@]}")
echo "KEYGATE_REDIS_CLUSTER_DIR=$dir"
echo "KEYGATE_TEST_REDIS_CLUSTER=${urls%,}"
