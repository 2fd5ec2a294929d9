#!/usr/bin/env bash
# The reference system as a user installs it: build the wheel and the sdist, install
# the wheel with the `server` extra into a brand-new virtual environment outside the
# source tree, then, from an empty directory, start `imkit-cluster`, chat alice -> bob
# with `imkit-chat`, fetch the web page, and stop the launcher with Ctrl-C (SIGINT).
set -euo pipefail
PY=${PY:-.venv/bin/python}          # builds the distributions (needs `build`)
BASE=${BASE_PYTHON:-python3}        # creates the user's fresh venv
src=$(pwd)
dir=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && { kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; rm -rf "$dir"' EXIT

"$PY" -m build --outdir "$dir/dist" "$src" >"$dir/build.log" 2>&1 || { cat "$dir/build.log"; exit 1; }
wheel=$(ls "$dir"/dist/imkit-*.whl)
ls "$dir"/dist/imkit-*.tar.gz >/dev/null
# nothing called `examples` (or tests, benchmarks) may land in site-packages
if unzip -Z1 "$wheel" | grep -Eq '^(examples|tests|benchmarks)/'; then
    echo "the wheel holds a top-level examples/tests/benchmarks package"; exit 1
fi

"$BASE" -m venv "$dir/venv"
"$dir/venv/bin/python" -m pip install -q "$wheel[server]" 2>&1 | grep -v '^WARNING: Location' || true
"$dir/venv/bin/python" -c 'import imkit_examples.cluster' || { echo "install failed"; exit 1; }

mkdir "$dir/empty" && cd "$dir/empty"    # no checkout on sys.path
"$dir/venv/bin/imkit-cluster" --help >/dev/null
"$dir/venv/bin/imkit-cluster" --dev --port-base 0 --ready-file "$dir/ready.json" -q >"$dir/cluster.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -s "$dir/ready.json" ] && break; sleep 0.1; done
[ -s "$dir/ready.json" ] || { echo "imkit-cluster did not start"; cat "$dir/cluster.log"; exit 1; }
read -r ipconf web < <("$dir/venv/bin/python" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["ipconf"], d["gateways"][0]["web"] or "")' "$dir/ready.json")

"$dir/venv/bin/imkit-chat" --user bob --to alice --ipconf "$ipconf" --expect 1 --timeout 20 >"$dir/bob.out" &
bob=$!
sleep 1
"$dir/venv/bin/imkit-chat" --user alice --to bob --ipconf "$ipconf" --send "hello from the wheel" --timeout 20
wait "$bob"
grep -q "hello from the wheel" "$dir/bob.out" || { echo "bob did not get the message"; cat "$dir/bob.out"; exit 1; }
if [ -n "$web" ]; then
    "$dir/venv/bin/python" - "$web" <<'PYEOF'
import sys, urllib.request
base = sys.argv[1].rstrip("/")
for path in ("/", "/app.js", "/cbor.js"):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        assert r.status == 200 and r.read(), path
PYEOF
fi
kill -INT "$pid"; wait "$pid"; pid=
echo "wheel OK: $(basename "$wheel") installed outside the tree; imkit-cluster up, imkit-chat alice -> bob delivered, web page served"
