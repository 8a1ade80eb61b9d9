#!/usr/bin/env bash
# What the gateway benchmark needs beyond the project's own virtualenv:
#  * Debian's nginx, the static upstream every gateway calls;
#  * the LiteLLM proxy (PyPI litellm[proxy]) in a virtualenv of its own,
#    bench/.cache/litellm-venv, so its many pins never touch the project's .venv.
# Both steps are skipped when already done; bench/bench_gateway.py runs this
# script on first use. LITELLM_SPEC pins another version (litellm[proxy]==X.Y.Z).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LITELLM_VENV:-$HERE/../.cache/litellm-venv}"
SPEC="${LITELLM_SPEC:-litellm[proxy]}"
PYTHON="${PYTHON:-python3.11}"

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  echo "installing nginx for the gateway benchmark's upstream" >&2
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q nginx-light || $SUDO apt-get install -y -q nginx
fi

if [ ! -x "$VENV/bin/litellm" ]; then
  echo "creating $VENV with $SPEC (a few minutes, once)" >&2
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$SPEC"
fi
