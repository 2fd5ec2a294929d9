#!/usr/bin/env bash
# Checks the README quick start end to end, as a user would run it: start the
# launcher (`make run`'s command), bob waits for a message, alice sends one with the
# terminal client, then the launcher is stopped with Ctrl-C (SIGINT).
set -euo pipefail
PY=${PY:-.venv/bin/python}
dir=$(mktemp -d)
trap 'kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT

# Free ports (--port-base 0) so a busy machine cannot break the check.
"$PY" -m examples.cluster --dev --port-base 0 --ready-file "$dir/ready.json" -q >"$dir/cluster.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -s "$dir/ready.json" ] && break; sleep 0.1; done
[ -s "$dir/ready.json" ] || { echo "launcher did not start"; cat "$dir/cluster.log"; exit 1; }
ipconf=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["ipconf"])' "$dir/ready.json")

"$PY" -m examples.chat --user bob --to alice --ipconf "$ipconf" --expect 1 --timeout 20 >"$dir/bob.out" &
bob=$!
sleep 1
"$PY" -m examples.chat --user alice --to bob --ipconf "$ipconf" --send "hello from the quick start" --timeout 20
wait "$bob"
grep -q "hello from the quick start" "$dir/bob.out" || { echo "bob did not get the message"; cat "$dir/bob.out"; exit 1; }
kill -INT "$pid"; wait "$pid"
echo "quick start OK: launcher up, alice -> bob delivered, launcher stopped"
