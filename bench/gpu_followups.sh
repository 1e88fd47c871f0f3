#!/bin/bash
# The GPU measurements left open by sessions without a GPU, as one call on the lent machine (about 9 minutes
# on an H200; each step stops starting work at its deadline and keeps what it measured under $OUT):
#
#   mkdir -p .stage/before && git archive e9139af lora_trainer ':!lora_trainer/demo/model' | tar -x -C .stage/before  # here
#   run(command="bash bench/gpu_followups.sh", carry=[".whl", ".stage/before"])
#
# .whl: diffusers & co. and a trimmed bitsandbytes as wheels (the machine has no network); .stage/before: the
# package before this session's changes (the machine gets a copy of the working tree, not the git history).
#
# 1. Issue 18: the Flux hand-off per storage format after eb37b92 (the text encoders' token tables stay Forge's):
#    the VRAM it adds must be ~0 (324 MiB before; 0.26 MiB counted on the CPU, flux_forge_handoff_cpu_accounting.md).
# 2. Issue 14: the whole command, ours only, at this commit and at e9139af (`--before`: before the bitsandbytes
#    hiding, the meta-device LoRA injection and the batched latent caching of 2026-12-05, startup_cpu.md), plus
#    the "did it learn?" scoring A/B (`no_validation`) on a warm machine.
set -u
T=$(date +%s)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v "already exists"
left() { echo $(( $1 - $(date +%s) + T )); }
END=${END:-590}  # seconds from the start by which everything ends (less device time left: a smaller END)

PYTHONPATH=/tmp/site:$PWD/.whl/bnb timeout "$(left 250)" python3 bench/flux_forge_handoff.py \
    --out "$OUT/flux_forge_handoff_h200_after_eb37b92.json" --deadline 190 2>&1 | grep '^[a-z0-9_]*: {' | cut -c1-420

BEFORE=()
[ -d .stage/before/lora_trainer ] && BEFORE=(--before "$PWD/.stage/before" --before-cases sd15_b1,sdxl_b1)
timeout "$(left "$END")" python3 bench/e2e_vs_kohya.py --skip-kohya --ours-site /tmp/site --cases sd15_b1,sdxl_b1,sd15_b8 --compile-bytecode \
    "${BEFORE[@]}" --variants no_validation --variant-steps 400 \
    --out "$OUT/e2e_ours_h200_followups.json" --deadline "$(left $((END - 260)))" 2>&1 | grep -v '^\[transformers\]' | tail -12
echo "wall $(( $(date +%s) - T )) s"
