#!/usr/bin/env bash
# System packages the stack needs: redis-server (the path cache), the shared
# libpython that Triton's python-backend stub links, headless chromium (the
# browser test of the review report renders it) and, where Node is missing,
# Debian's nodejs and npm for the Node client (our machines bring Node 20). Installed through
# apt when missing and we are root; otherwise say what is missing and go on
# (the gateway falls back to its in-process cache without redis-server).
set -euo pipefail

pyver="$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')"
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ldconfig -p | grep -q "libpython${pyver}.so.1.0" || missing+=("libpython${pyver}")
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "warning: missing system packages (install them with your package manager): ${missing[*]}" >&2
fi
