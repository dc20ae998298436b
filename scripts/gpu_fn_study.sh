#!/usr/bin/env bash
# The false-negative study's GPU preset as one prepared job on an offline GPU machine that has torch but not
# Ray (the device machine lent to some sessions). Here, once:
#   bash ../shared/tools/offline-gpu-wheels.sh .gpu-wheels && echo .gpu-wheels >> .git/info/exclude
# There (carry .gpu-wheels; results and logs land in $OUT):
#   bash scripts/gpu_fn_study.sh .gpu-wheels [more fn_study options, e.g. --seeds 3]
# Untested on a GPU so far: the steps follow offline-gpu-wheels.sh and the one GPU run on record.
set -euo pipefail
wheels=${1:?usage: gpu_fn_study.sh WHEELS_DIR [fn_study options]}
shift
out=${OUT:-runs}
mkdir -p "$out"
python3 - "$wheels" <<'PY'
import glob, os, sys, zipfile
for f in sorted(glob.glob(f"{sys.argv[1]}/*.whl")) + [f"{sys.argv[1]}/ray-stripped.zip"]:
    z = zipfile.ZipFile(f)
    for i in z.infolist():
        path, mode = z.extract(i, "/tmp/site"), (i.external_attr >> 16) & 0o777
        if mode and not i.is_dir():
            os.chmod(path, mode)  # raylet and gcs_server are executables
PY
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
python3 -c "import sys; from ray.scripts.scripts import main; sys.argv=['ray','start','--head','--include-dashboard=false','--num-gpus=1','--disable-usage-stats']; main()" > "$out/ray-start.log" 2>&1
export RAY_ADDRESS=127.0.0.1:6379
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv -l 30 > "$out/gpu-usage.csv" 2>&1 &
smi=$!
trap 'kill $smi 2>/dev/null; python3 -c "import sys; from ray.scripts.scripts import main; sys.argv=[\"ray\",\"stop\",\"--force\"]; main()" > /dev/null 2>&1' EXIT
python3 experiments/fn_study.py --preset gpu --out "$out/fn_study" "$@" > "$out/fn_study.log" 2>&1 || echo "fn_study exited $?"
tail -40 "$out/fn_study.log"
