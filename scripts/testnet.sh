#!/usr/bin/env bash
# Local multi-node kpnode testnet on 127.0.0.1.
#
#   scripts/testnet.sh up [N]     build kpnode, start a bootstrap node and N-1 nodes (default 5),
#                                 wait until all are ready, print their API URLs and peer IDs
#   scripts/testnet.sh status     state, peers and counts of each node
#   scripts/testnet.sh logs [i]   node i's log, or the last lines of every node's
#   scripts/testnet.sh down       stop the nodes this testnet started (by PID)
#   scripts/testnet.sh kill i     SIGKILL node i (a crash; data and log stay)
#   scripts/testnet.sh start i    restart node i on its data dir and ports, wait until ready
#
# Environment: TESTNET_DIR (default ./.testnet), TESTNET_API_BASE (18080: node i's
# API is on 18080+i), TESTNET_P2P_BASE (19080), TESTNET_NETWORK (kpnode-testnet),
# TESTNET_NODE_FLAGS (extra flags for every node, e.g. "--mls-validation off").
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="${TESTNET_DIR:-./.testnet}"
bin="$dir/bin"
cmd="${1:-}"
case "$cmd" in
  up)
    mkdir -p "$bin"
    (cd "$root" && go build -o "$(cd "$bin" && pwd)/kpnode" ./cmd/kpnode && go build -o "$(cd "$bin" && pwd)/launch" ./testnet/launch)
    exec "$bin/launch" -bin "$(cd "$bin" && pwd)/kpnode" -dir "$dir" "$@"
    ;;
  status|logs|down|kill|start)
    if [ ! -x "$bin/launch" ]; then
      echo "testnet: nothing in $dir (run 'up' first)" >&2; exit 1
    fi
    exec "$bin/launch" -bin "$(cd "$bin" && pwd)/kpnode" -dir "$dir" "$@"
    ;;
  *)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
