#!/usr/bin/env bash
# Many seeds of bench/segment.py side by side on one GPU machine (the workplace's device tool), merged into one
# result file with its report.  Each of PROCS processes trains its own seeds (i, i + PROCS, i + 2 PROCS, ...)
# until SECONDS have passed; a seed that cannot finish by then is lost, the finished ones are kept.
#
#   bench/segment_gpu.sh PROCS SECONDS OUTDIR [bench/segment.py options, e.g. --epochs 24 --nbs 16]
#
# On the device machine the wheels of ultralytics, ultralytics-thop and pycocotools (for its Python, 3.12) travel
# in .whl/ (git-ignored through .git/info/exclude; see the device tool's README for `pip download`).  polars, which
# ultralytics imports only to read its results.csv back into the checkpoint (inside a try), gets an empty stand-in.
# DEVICE (default 0) and SKIP_INSTALL=1 let the script be tried on a machine without a GPU.
set -u
procs=$1 secs=$2 out=$3
shift 3
if [ -z "${SKIP_INSTALL:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    mkdir -p /tmp/site/polars && : > /tmp/site/polars/__init__.py
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
mkdir -p "$out"
nvidia-smi -L 2>/dev/null
"$py" -c "import torch, ultralytics, pycocotools; print('torch', torch.__version__, 'ultralytics', ultralytics.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1
for i in $(seq 0 $((procs - 1))); do
    seeds=$(seq -s, "$i" "$procs" $((i + 20 * procs)))
    timeout "$secs" "$py" bench/segment.py --device "${DEVICE:-0}" --seeds "$seeds" --max-wait 0 \
        --out "$out/seg-$i.json" "$@" > "/tmp/segment-gpu-$i.log" 2>&1 &
done
wait
for i in $(seq 0 $((procs - 1))); do
    echo "=== process $i"
    grep -E "seed [0-9]+:|YOLOv8n|inference |Error|Traceback" "/tmp/segment-gpu-$i.log" | grep -v "per class"
    tail -n 3 "/tmp/segment-gpu-$i.log"
done > "$out/logs.txt"
files=$(ls "$out"/seg-*.json 2>/dev/null)
[ -n "$files" ] || { echo "no seed finished"; tail -n 30 /tmp/segment-gpu-0.log; exit 1; }
"$py" bench/segment.py --merge $files --out "$out/merged.json" >/dev/null && rm $files
"$py" bench/segment.py --report --out "$out/merged.json"
