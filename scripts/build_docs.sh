#!/bin/sh
# Build the documentation site (mkdocs + mkdocstrings) into a temporary directory,
# strictly: any warning (a broken link or anchor, a page missing from the nav, a
# dangling cross-reference, a docstring mkdocstrings cannot render) fails the build.
#
#   scripts/build_docs.sh            # build and throw the site away (CI)
#   scripts/build_docs.sh DIR        # build into DIR and keep it
#
# Needs mkdocs and mkdocstrings-python (the `docs` extra). Uses $PYTHON, else
# ./.venv/bin/python when it exists, else python3.
set -eu

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ $# -ge 1 ]; then
    site=$1
    cleanup=
else
    site=$(mktemp -d "${TMPDIR:-/tmp}/imkit-docs.XXXXXX")
    cleanup=$site
fi
log=$(mktemp "${TMPDIR:-/tmp}/imkit-docs-log.XXXXXX")
trap 'rm -rf "$log" ${cleanup:+"$cleanup"}' EXIT

status=0
"$PYTHON" -m mkdocs build --strict --config-file mkdocs.yml --site-dir "$site" >"$log" 2>&1 || status=$?
cat "$log"
# --strict aborts on warnings; also refuse any WARNING line mkdocs printed anyway
# (a plugin that logs a warning after the strict check would otherwise pass).
if [ "$status" -ne 0 ] || grep -q "WARNING" "$log"; then
    echo "build_docs: FAILED (warnings are errors)" >&2
    exit 1
fi
echo "build_docs: ok (${1:-temporary site removed})"
