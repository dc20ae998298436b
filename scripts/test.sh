#!/usr/bin/env bash
# Quickstart command 2 (and CI): set up, then run the test suite.
source "$(dirname "$0")/setup.sh"
exec python -m pytest -q --durations=15 "$@"
