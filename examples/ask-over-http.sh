#!/usr/bin/env bash
# Start `ragline serve`, ask it one question over HTTP, print the answer with
# its citations, and stop the service again.
#
# Usage: examples/ask-over-http.sh RAGLINE CONFIG PORT QUESTION
set -euo pipefail
ragline=$1 config=$2 port=$3 question=$4
url="http://127.0.0.1:$port"
log=$(mktemp -t ragline-serve.XXXXXX.log)
python="$(dirname "$ragline")/python"

"$ragline" --config "$config" serve --port "$port" 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT

ready=""
for _ in $(seq 1 180); do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "ragline serve exited before it was ready:" >&2
    cat "$log" >&2
    exit 1
  fi
  if "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "$url/readyz" >/dev/null 2>&1; then
    ready=yes
    break
  fi
  sleep 1
done
if [ -z "$ready" ]; then
  echo "ragline serve was not ready after 180 s; its log:" >&2
  cat "$log" >&2
  exit 1
fi

echo "asking $url/ask: $question"
"$ragline" --config "$config" ask "$question" --collection docs --url "$url"
