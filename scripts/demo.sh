#!/usr/bin/env bash
# Quickstart command 1: set up, then run the main job (the K sweep) on built-in data with local Ray, at the
# Quickstart's budget (--epochs 2: 32 optimizer steps, ~5 min; the K sweep's own default is the study's 600).
source "$(dirname "$0")/setup.sh"
exec python experiments/sweep_k.py --epochs 2 "$@"
