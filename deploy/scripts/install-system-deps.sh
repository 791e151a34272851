#!/usr/bin/env bash
# System packages the stack needs: redis-server (the path cache), the shared
# libpython that Triton's python-backend stub links, headless chromium (the
# browser test of the review report renders it) and chromium-driver (selenium drives
# it in the class explorer's browser test), promtool (Debian's prometheus
# package: `make test` checks the alert rules with it), tmux (the CLI layout tests capture
# its output at 80 and 120 columns), graphviz (its dot lays out the SVG of a causal graph:
# GraphResult.to_svg, `propscope graph --svg`) and, where Node is missing,
# Debian's nodejs and npm for the Node client (our machines bring Node 20). Installed through
# apt when missing and we are root; otherwise say what is missing and go on
# (the gateway falls back to its in-process cache without redis-server).
#
# libpython is looked for first in the lib directory of the Python that builds the venv
# ($PYTHON, default python3: sysconfig's LIBDIR), where pyenv and actions/setup-python put
# it and where the Triton launcher finds it; only then among the system's libraries.
# Under sudo, pass that Python: `sudo PYTHON="$(command -v python3)" install-system-deps.sh`.
#
# --dry-run: print what would be installed (`missing: ...`) and install nothing.
set -euo pipefail

dry_run=false
if [ "${1:-}" = "--dry-run" ]; then
  dry_run=true
fi

python="${PYTHON:-python3}"
{ read -r pyver; read -r libdir; } < <(
  "$python" -c 'import sys, sysconfig; print("%d.%d" % sys.version_info[:2]); print(sysconfig.get_config_var("LIBDIR") or "")'
)
libpython="libpython${pyver}.so.1.0"

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ -e "${libdir}/${libpython}" ]; then
  :  # the interpreter's own shared library
elif ! ldconfig -p | grep -q "${libpython}"; then
  missing+=("libpython${pyver}")
fi
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
command -v dot >/dev/null 2>&1 || missing+=(graphviz)
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)

if [ "$dry_run" = true ]; then
  echo "missing: ${missing[*]}"
  exit 0
fi
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
