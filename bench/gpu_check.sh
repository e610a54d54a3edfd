#!/usr/bin/env bash
# The GPU checks of one device session, in order, each bounded in time (figures land in
# $OUT even when a later part is cut): CPU/GPU parity of every kernel test that has a
# CuPy variant, then a whole run timed step by step. Usage on a GPU machine with CuPy:
#   OUT=out_dir bash bench/gpu_check.sh [n_particles] [box] [classes] [iterations]
set -u
N=${1:-50000}; BOX=${2:-128}; K=${3:-4}; IT=${4:-5}
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD/src"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import cupy; print('cupy', cupy.__version__)" | tee -a "$OUT/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_parity.py \
    tests/test_{alignment,backend,ctf,fourier,fsc,mask,projection,reconstruction,symmetry,marginalisation,validation}.py \
    -k "cupy or parity or gpu" 2>&1 | tail -25 | tee "$OUT/parity.log"
timeout "${WHOLE_RUN_S:-330}" python3 bench/whole_run.py --n "$N" --box "$BOX" --classes "$K" \
    --iterations "$IT" --shard-size 5000 --device gpu --out /tmp/wr --json "$OUT/whole_run.json" \
    2>&1 | tail -40 | tee "$OUT/whole_run.log"
