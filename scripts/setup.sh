# Sourced by demo.sh and test.sh: use the active virtualenv, or create .venv, and install raysys.
# pip resolves torch/torchvision to the builds already on disk where a pip constraint caps them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import raysys, torch, torchvision, ray" || { echo "setup failed: raysys or its dependencies did not import" >&2; exit 1; }
