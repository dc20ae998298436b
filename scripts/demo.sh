#!/usr/bin/env bash
# Quickstart command 1: set up, then run the main job (the K sweep) on built-in data with local Ray.
source "$(dirname "$0")/setup.sh"
exec python experiments/sweep_k.py "$@"
