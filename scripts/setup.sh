#!/usr/bin/env bash
# One-time set-up: a virtual environment with the package, and a software GL for headless rendering.
set -euo pipefail
venv="${1:-.venv}"

have_osmesa() { ldconfig -p 2>/dev/null | grep -q 'libOSMesa\.so'; }
if ! have_osmesa; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo ">> installing the software GL (libosmesa6) for headless rendering"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libosmesa6 >/dev/null
  else
    echo ">> no OSMesa found and not root: rendering needs it. Run: sudo apt-get install libosmesa6" >&2
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo ">> creating $venv"
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
echo ">> installing policy-improver and its dependencies (first time: a few minutes)"
"$venv/bin/python" -m pip install -q -e '.[dev,baselines]'
touch "$venv/.installed"
