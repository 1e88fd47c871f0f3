#!/bin/bash
# The second pretraining call of the demo models (docs/demo-model.md): on one GPU, the VAE's decoder
# is fine-tuned beside the two denoisers, which continue from the first call's weights; everything
# under $OUT. INIT: the first call's output folder; WHL: wheels of packages the GPU machine lacks
# (diffusers 0.42.1, importlib_metadata). SMOKE=1: a short CPU run of the same thing.
#   INIT=... WHL=... OUT=... bash bench/demo_pretrain_h200.sh
S=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "$SMOKE" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=$S/..:/tmp/site
  DEV="--device cuda"; A=50; B=175; C=250
else
  export PYTHONPATH=$S/..
  DEV="--smoke --device cpu"; A=20; B=30; C=45
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
T=$(date +%s)
python3 -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.is_available())"
python3 "$S/demo_pretrain.py" $DEV --stage decoder --init "$INIT" --out "$OUT" --log-name pretrain-vae.json \
  --until $((T + A)) --vae-batch 128 2>&1 | sed 's/^/[vae] /' &
python3 "$S/demo_pretrain.py" $DEV --stage denoisers --init "$INIT" --out "$OUT" --log-name pretrain-denoisers.json \
  --variant shapes-sd1=@$((T + B)) --variant shapes-mini=@$((T + C)) --batch 256 2>&1 | sed 's/^/[unet] /' &
wait
ls -la "$OUT"
echo "wall $(( $(date +%s) - T )) s"
