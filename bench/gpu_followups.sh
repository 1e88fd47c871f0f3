#!/bin/bash
# The GPU measurements left open at the end of a session (2026-12-06), as one call on the lent machine (about
# 8 minutes on an H100; each step stops starting work at its deadline and keeps what it measured under $OUT):
#
#   run(command="bash bench/gpu_followups.sh", carry=[".whl/ours", ".whl/kohya-trim", ".kohya"])
#   run(command="STAGE=sd bash bench/gpu_followups.sh", carry=[...the same])   # the second call: step 3
#   run(command="STAGE=sdprofile END=500 bash bench/gpu_followups.sh", carry=[...the same])  # SDXL/SD1.5 b8 profiles
#   run(command="STAGE=lean END=400 CASES=sd15:8,sd15:1,sdxl:1 bash bench/gpu_followups.sh", carry=[".whl/ours"])
#       # next (2026-12-07): the lean Linear product's SD1.5 A/Bs and tests/test_accel_cuda.py with it (the last call
#       # measured SDXL b1 only: results/speed_lean_h100.md)
#   run(command="STAGE=lean END=450 CASES=sdxl:1,sd15:8 VARIANTS=default,cl,cltorchgn,nolean,default,cl
#       bash bench/gpu_followups.sh", carry=[".whl/ours"])  # next: the NHWC GroupNorm (channels_last end to end;
#       # accel/group_norm_nhwc.py) against channels_last with torch's GroupNorm and the default, with the lean
#       # product's A/B and the accel GPU tests (tests/test_accel_cuda.py has the NHWC GroupNorm's GPU test)
#       # then, if cl wins: the whole command with it (e2e_hooks' channels_last variant), e.g. STAGE=sd with
#       # --variants channels_last@sd15_b1,channels_last@sdxl_b1 (edit the sd stage's list), and flip the default;
#       # early_lora@sd15_b1,early_lora@sdxl_b1 (LoRA injection beside latent caching) in the same call, and
#       # tests/test_train_cuda.py (its early_lora test)
#       # 2026-12-07, H100: STAGE=lean END=540 CASES=sdxl:1,sd15:8 VARIANTS=default,cl,noalpha,cltorchgn,nolean,default,cl
#       # -> results/speed_cl_h100.md (cl wins with the NHWC GroupNorm: on by default since)
#   2026-12-07, H100: STAGE=final END=555 (its earlier form: the GEGLU GPU test and cl/geglu A/B first):
#       results/speed_geglu_h100.md (fused_geglu on since); its whole-command part failed in the benchmark's hook
#   2026-12-07, H100s: STAGE=final END=585, then STAGE=final END=460 TESTS_S=100 (the present form):
#       results/e2e_vs_kohya_h100_defaults.md (SD1.5 b1 5.40x, SDXL 4.04x; kohya's SD1.5 b8 and late_lora not reached)
#   2026-12-07 (later), H100: STAGE=final END=585 TESTS_S=150 WEBUI=1 CASES=sd15_b8,sd15_b1 SD_VARIANTS=no_ahead@sd15_b8,
#       no_ahead@sd15_b1 SD_TAG=h100_ahead -> results/e2e_vs_kohya_h100_ahead.md (SD1.5 b8 2.84x, b1 5.43x with the
#       batch made ahead; its GPU stop/resume test failed, so it is off by default)
#   2026-12-07 (later still), H100: pytest tests/test_train_cuda.py -k "stop_resume or early" (3 passed) and
#       bench/ahead_check.py -> results/ahead_check_h100.json (the batch made ahead on by default since), then
#       STAGE=final END=400 TESTS_S=1 WEBUI=1 CASES=sd15_b8 SD_VARIANTS=fast_exit@sd15_b8,score_at_batch@sd15_b8
#       SD_TAG=ahead_default -> results/e2e_vs_kohya_h100_final_write.md (SD1.5 b8 2.80x and, repeated, 3.18x)
#   next: PYTHONPATH=/tmp/site python3 -m pytest -q tests/test_triton_check.py (the early kernel checks on the GPU),
#       then STAGE=final END=585 TESTS_S=1 WEBUI=1 CASES=sd15_b8,sdxl_b1 SD_VARIANTS=early_check@sd15_b8,
#       early_check@sdxl_b1,rehearse_unet@sdxl_b1 (kohya's SDXL beside ours with the batch made ahead; the Triton
#       checks beside the model build; SDXL's first eager step rehearsed beside caching)
#   run(command="STAGE=fused bash bench/gpu_followups.sh", carry=[...the same])  # Flux fused math + fp8 products
#   run(command="STAGE=profile bash bench/gpu_followups.sh", carry=[".whl/ours"])  # Flux 24 GB step, by kernel kind
#   run(command="STAGE=dequant bash bench/gpu_followups.sh", carry=[...the first's])  # compiled fp8 dequant vs kohya
#   run(command="STAGE=all15 END=585 bash bench/gpu_followups.sh", carry=[...the first's])  # issue 15's open
#       measurements in one call (fp8 GPU tests, every Flux preset vs kohya, the levers' A/Bs, the training test);
#       a short call (2026-12-06, H200): STAGE=all15 END=290 TEST_S=45 TESTS_AFTER=0 ORDER=R1,K24,R2,K16
#       2026-12-07, H200 (results/flux_vs_kohya_h200_keep.md): STAGE=all15 END=440 TEST_S=60 TESTS_AFTER=70
#       ORDER=R1,K24,R1K,R2,K16,R16,R3, then on the warm machine END=230 TEST_S=1 TESTS_AFTER=0 ORDER=K16,R16,R3
#       next: on an H100 (kind nvidia-h100-x1; the 24 GB ratio there was 1.88x before four levers) with the
#       default ORDER: R1 vs K24, R3 (not measured since the lean product), R1F (fp8 products with them)
#       2026-12-07, H100: STAGE=all15 END=585 TEST_S=60 TESTS_AFTER=70 OURS=R1,R0,R3,R1K,R2,R16
#       ORDER=R1,K24,R0,R3,R1K,R2,K16,R16 (R0: the eager bf16 reference, for the loss curve with every lever):
#       results/flux_vs_kohya_h100_all15.md, every target of issue 15 met in that one call
#
# 1. accel/ on the GPU (tests/test_accel_cuda.py): the work between steps inside the graphs' pool, on the capture
#    stream (`9ad112a`), and the fp8 products captured with a plain-cast weight (`8767299`).
# 2. Issue 15: Flux presets with the epoch-end scoring after `9ad112a`. Expected: the scoring no longer adds to the
#    peak (R2 ~10.3 GiB as R2N, R3 ~7.2, R1 ~15.8; bench/results/flux_vs_kohya_h100_pool.md); the log tail's
#    "between steps" line says how much the graphs' pool grew (it grew 1.55 GiB on the default stream).
#    R1F/R2F: fp8 products in graphs (R1F +3-4 % in the last call), kohya K24/K16 for the ratios.
# 3. (STAGE=sd) Issue 14: the whole command vs kohya with the scoring variants never measured on a GPU:
#    `score_batch8` (8 pairs per scoring pass), `rehearse_unet`, and SDXL without scoring; ~7 minutes.
set -u
T=$(date +%s)
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
left() { echo $(( $1 - $(date +%s) + T )); }
END=${END:-500}  # seconds from the start by which everything ends (less device time left: a smaller END)
pip install -q --no-index --no-deps --target /tmp/site .whl/ours/*.whl 2>&1 | grep -v "already exists\|WARNING: Running"
python3 -m pip install -q --no-index --no-deps --target /tmp/kohya-site .whl/kohya-trim/*.whl 2>&1 \
    | grep -v "already exists\|WARNING: Running"
nvidia-smi --query-gpu=name --format=csv,noheader

if [ "${STAGE:-flux}" = fused ]; then  # Flux: fused block math (accel/fused_math.py) with fp8 products
    # measured 2026-12-06 (bench/results/flux_vs_kohya_h100_fused.md): R1 1.69x, R2 1.80x kohya with the fused
    # block math. Open: its part two (re-applied 2026-12-06 with dynamo's recompile limit raised for it), fp8 products with the compiled
    # row rounding (f7bd59e) forward (R1F, R2F) and backward too (R1B); the 24 GB target needs 2x K24.
    PYTHONPATH=/tmp/site timeout 240 python3 -m pytest -q tests/test_fused_math.py \
        tests/test_accel_cuda.py::test_fused_flux_block_math_matches_eager_inside_cuda_graphs \
        tests/test_fp8_cuda.py::test_fp8_products_on_gpu_close_and_captured \
        tests/test_train_flux_cuda.py 2>&1 | tail -6 | tee "$OUT/test_fused_math_cuda.log"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_h100_fused.json" \
        --ours R1,R1F,R1B,R2,R2F,R3 --order R1,R1F,R1B,K24,R2,R2F,K16,R3 --deadline "$(left $((END - 70)))" \
        2>&1 | tail -10
    python3 -c "import json,sys; print('compile fallbacks:', json.load(open(sys.argv[1])).get('ours_compile_fallbacks'))" \
        "$OUT/flux_vs_kohya_h100_fused.json" 2>/dev/null
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = fused2 ]; then  # the fused call again with longer steady windows (2026-12-06, H200)
    PYTHONPATH=/tmp/site timeout 60 python3 -m pytest -x -q -p no:logging \
        tests/test_fused_math.py::test_traced_block_math_is_the_same_function_forward_and_backward 2>&1 \
        | grep -E "^E |passed|failed" | head -30 | tee "$OUT/test_fused_math_traced.log"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_h200_fused.json" \
        --steps 20 --kohya-steps 16 --ours R1,R1F,R1B --order R1,R1F,R1B,K24 \
        --deadline "$(left $((END - 80)))" 2>&1 | tail -10
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = profile ]; then  # where the 24 GB Flux step's time goes (issue 15's last 2x), ~6 min;
    # profiles of R1/R1F (graphs) and R1 (eager launches), the eager bf16 reference R0's losses over 20 steps (bf16
    # noise for the fp8 products' drift), then R1Q beside R1: the fused block math's second part's own gain
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --skip-kohya --work /tmp/fluxbench \
        --out "$OUT/flux_profile.json" --ours R1P,R1FP,R0,R1PE,R1,R1Q --order R1P,R1FP,R0,R1PE,R1,R1Q \
        --steps 20 --deadline "$(left $((END - 60)))" \
        2>&1 | tail -5
    python3 -c "import json,sys; [print(k, json.dumps(v.get('profile'))) for k, v in json.load(open(sys.argv[1]))['ours'].items()]" \
        "$OUT/flux_profile.json" 2>/dev/null
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = dequant ]; then  # the fp8 base dequantised by one compiled kernel (use_fused_dequant), ~9 min
    # the profile (flux_profile_h100.md) put torch's fp8 cast at 104 of R1's 624 ms of GPU time per step
    PYTHONPATH=/tmp/site timeout 150 python3 -m pytest -q -p no:logging \
        tests/test_fp8_cuda.py::test_fused_dequant_on_gpu_gives_the_eager_values_and_is_captured \
        tests/test_accel_cuda.py::test_fused_flux_block_math_matches_eager_inside_cuda_graphs \
        tests/test_fp8_cuda.py::test_fp8_products_on_gpu_close_and_captured tests/test_quant.py 2>&1 \
        | grep -E "^E |passed|failed" | head -30 | tee "$OUT/test_fused_dequant_cuda.log"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_dequant.json" \
        --steps 20 --kohya-steps 14 --ours R1,R1X,R1F,R3,R2 --order R1,R1X,R1F,K24,R3,R2 \
        --deadline "$(left $((END - 70)))" 2>&1 | tail -8
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = quick ]; then  # the compiled dequant and the lean LoRA product on a GPU: tests only, ~2 min
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 -m pytest -q -p no:logging -x \
        tests/test_fp8_cuda.py::test_lean_lora_product_over_fp8_base_on_gpu_matches_peft_and_is_captured \
        tests/test_fp8_cuda.py::test_fused_dequant_on_gpu_gives_the_eager_values_and_is_captured \
        tests/test_train_flux_cuda.py 2>&1 | grep -E "^E |passed|failed" | head -30 | tee "$OUT/test_quick_cuda.log"
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = dequant2 ]; then  # after the compiled dequant: the step's profile, R1/R1F vs kohya, TunableOp
    PYTHONPATH=/tmp/site timeout 60 python3 -m pytest -q -p no:logging \
        tests/test_fp8_cuda.py::test_fused_dequant_on_gpu_gives_the_eager_values_and_is_captured \
        tests/test_fp8_cuda.py::test_lean_lora_product_over_fp8_base_on_gpu_matches_peft_and_is_captured \
        2>&1 | grep -E "^E |passed|failed" | head -20 | tee "$OUT/test_fused_dequant_cuda.log"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_dequant2.json" \
        --steps 20 --kohya-steps 14 --ours R1,R1L,R1P,R1F,R1T --order R1,R1L,K24,R1P,R1F,R1T \
        --deadline "$(left $((END - 90)))" 2>&1 | tail -6
    python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['ours']['R1P'].get('profile')))" \
        "$OUT/flux_vs_kohya_dequant2.json" 2>/dev/null
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = layout ]; then  # the lean LoRA product, the tokens-first attention layout, modulations outside the checkpoints
    PYTHONPATH=/tmp/site timeout 170 python3 -m pytest -q -p no:logging \
        tests/test_fp8_cuda.py tests/test_accel_cuda.py::test_flux_attention_output_is_a_view_not_a_transposing_copy \
        tests/test_accel_cuda.py::test_fused_flux_block_math_matches_eager_inside_cuda_graphs \
        tests/test_train_flux_cuda.py 2>&1 | grep -E "^E |passed|failed" | head -30 | tee "$OUT/test_layout_cuda.log"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_layout.json" \
        --steps 20 --kohya-steps 14 --ours R1,R1H,R1L,R1M,R1F --order R1,R1H,R1L,K24,R1M,R1F \
        --deadline "$(left $((END - 60)))" 2>&1 | tail -6
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = all15 ]; then  # issue 15's open measurements in one call (2026-12-06, ~9.5 min): GPU tests,
    # then every preset against kohya (24 GB, 12 GB vs swap 16, 16 GB), the A/Bs of this session's levers, and the
    # fp8-base/swap vs bf16 training test in the last TESTS_AFTER seconds
    TESTS_AFTER=${TESTS_AFTER:-90}
    PYTHONPATH=/tmp/site timeout "${TEST_S:-90}" python3 -m pytest -v -p no:logging \
        tests/test_accel_cuda.py::test_flux_attention_output_is_a_view_not_a_transposing_copy \
        tests/test_fp8_cuda.py::test_lean_lora_product_over_fp8_base_on_gpu_matches_peft_and_is_captured \
        tests/test_fp8_cuda.py 2>&1 | grep -E "^E |PASSED|FAILED|SKIPPED|passed|failed" | head -30 \
        | tee "$OUT/test_all15_cuda.log"
    PYTHONPATH=/tmp/site timeout "$(left $((END - TESTS_AFTER)))" python3 bench/flux_vs_kohya.py \
        --sd-scripts .kohya/sd-scripts --kohya-site /tmp/kohya-site --work /tmp/fluxbench \
        --out "$OUT/flux_vs_kohya_all15.json" --steps 20 --kohya-steps 12 --ours "${OURS:-R1,R2,R16,R3,R1M,R1H,R1L,R1K,R1F}" \
        --order "${ORDER:-R1,K24,R3,R1F,R1K,R2,K16,R16}" --deadline "$(left $((END - TESTS_AFTER - 75)))" 2>&1 | tail -8
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 -m pytest -q -p no:logging tests/test_train_flux_cuda.py \
        2>&1 | grep -E "^E |passed|failed" | head -30 | tee -a "$OUT/test_all15_cuda.log"
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = swap ]; then  # the swapping presets on one machine with kohya's swap 16, and R1 again
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_swap.json" \
        --steps 20 --kohya-steps 10 --ours R2,R16,R3,R1 --order R2,K16,R16,R3,R1 \
        --deadline "$(left $((END - 60)))" 2>&1 | tail -6
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = lean ]; then  # the lean Linear product (accel lean_lora_product) A/B: SDXL b1, SD1.5 b8 and b1,
    # then the accel GPU tests in what is left
    PYTHONPATH=/tmp/site timeout "$(left $((END - 60)))" python3 bench/speed.py --sections env,profile \
        --profile-cases "${CASES:-sdxl:1,sd15:8,sd15:1}" --profile-variants "${VARIANTS:-default,nolean,default,nolean}" \
        --deadline "$(left $((END - 70)))" --out "$OUT/speed_profile_lean.json" 2>&1 | grep -E "^profile|errors|total"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 -m pytest -q tests/test_accel_cuda.py \
        tests/test_accel.py tests/test_group_norm_nhwc.py tests/test_lora_alpha.py 2>&1 | grep -E "^E |passed|failed" | head -20 | tee "$OUT/test_accel_lean_cuda.log"
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = sdprofile ]; then  # issue 14's step: where SDXL b1's and SD1.5 b8's GPU time goes (with and
    # without channels_last), then the SD1.5 batch 8 whole command vs kohya on the same machine
    PYTHONPATH=/tmp/site timeout 260 python3 bench/speed.py --sections env,profile --profile-cases sdxl:1,sd15:8 \
        --deadline 240 --out "$OUT/speed_profile_sdxl_sd15b8.json" 2>&1 | grep -E "^profile|errors|total"
    timeout "$(left "$END")" python3 bench/e2e_vs_kohya.py --sd-scripts .kohya/sd-scripts --kohya-site /tmp/kohya-site \
        --ours-site /tmp/site --cases sd15_b8 --kohya-steps sd15_b8=30 --compile-bytecode --warm-runs \
        --out "$OUT/e2e_vs_kohya_sd15_b8.json" --deadline "$(left $((END - 30)))" 2>&1 | tail -6
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = short ]; then  # what little device time is left (~3 min): the GEGLU kernels' GPU test and A/B,
    # then the engine's GPU tests with the new defaults until END
    PYTHONPATH=/tmp/site timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_accel_cuda.py -k geglu 2>&1 \
        | grep -E "^E |passed|failed|error" | head -10 | tee "$OUT/test_geglu_cuda.log"
    PYTHONPATH=/tmp/site timeout 55 python3 bench/speed.py --sections env,profile --profile-cases sd15:8 \
        --profile-variants cl,geglu --deadline 50 --out "$OUT/speed_profile_geglu.json" 2>&1 | grep -E "^profile|errors|total"
    PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 -m pytest -v -p no:cacheprovider tests/test_train_cuda.py 2>&1 \
        | grep -E "^E |PASSED|FAILED|ERROR|passed|failed|error" | head -30 | tee "$OUT/test_train_cuda.log"
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = final ]; then  # 2026-12-07, the new defaults (channels_last, the scale as alpha, fused GEGLU,
    # early_lora): the engine's GPU tests first (-v: a test cut off still shows the ones before it), then the whole
    # command vs kohya (SD1.5 b1, SDXL b1, SD1.5 b8; the VARIANTS after them) until END
    PYTHONPATH=/tmp/site timeout "${TESTS_S:-110}" python3 -m pytest -v -p no:cacheprovider tests/test_train_cuda.py \
        2>&1 | grep -E "^E |PASSED|FAILED|ERROR|passed|failed|error" | head -30 | tee "$OUT/test_train_cuda.log"
    if [ "${WEBUI:-0}" = 1 ]; then  # "Train" -> first step in A1111's path with the model in memory (issue 14: <= 5 s)
        # twice: the first process on the machine JIT-compiles the Triton kernels (cached for the second)
        # (one file for both: a call brings back only a few files)
        for i in 1 2; do
            echo "=== run $i" >> "$OUT/webui_train_first_step_${SD_TAG:-h100_defaults}.log"
            PYTHONPATH=/tmp/site:$PWD timeout 120 python3 bench/webui_handoff.py --family sd1 --train --skip-handoff \
                >> "$OUT/webui_train_first_step_${SD_TAG:-h100_defaults}.log" 2>&1
        done
        grep -E '"train_to_first_step_s"' "$OUT/webui_train_first_step_${SD_TAG:-h100_defaults}.log"
    fi
    timeout "$(left "$END")" python3 bench/e2e_vs_kohya.py --sd-scripts .kohya/sd-scripts \
        --kohya-site /tmp/kohya-site --ours-site /tmp/site --cases "${CASES:-sd15_b1,sdxl_b1,sd15_b8}" \
        --kohya-steps sd15_b1=40,sdxl_b1=20,sd15_b8=30 \
        --compile-bytecode --warm-runs --variants "${SD_VARIANTS:-late_lora@sdxl_b1,late_lora@sd15_b1}" \
        --variant-steps 0 --out "$OUT/e2e_vs_kohya_${SD_TAG:-h100_defaults}.json" \
        --deadline "$(left $((END - 40)))" 2>&1 | tail -14
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

if [ "${STAGE:-flux}" = sd ]; then
    timeout "$(left "$END")" python3 bench/e2e_vs_kohya.py --sd-scripts .kohya/sd-scripts --kohya-site /tmp/kohya-site \
        --ours-site /tmp/site --cases sd15_b1,sdxl_b1 --kohya-steps sd15_b1=40,sdxl_b1=20 --compile-bytecode \
        --warm-runs --variants "${SD_VARIANTS:-score_batch8@sd15_b1,rehearse_unet@sd15_b1,score_batch8@sdxl_b1,no_validation@sdxl_b1}" \
        --variant-steps 0 --out "$OUT/e2e_vs_kohya_${SD_TAG:-h100_variants}.json" --deadline "$(left $((END - 90)))" 2>&1 | tail -14
    echo "wall $(( $(date +%s) - T )) s"
    exit 0
fi

PYTHONPATH=/tmp/site timeout 150 python3 -m pytest tests/test_accel_cuda.py -q 2>&1 | tail -4 | tee "$OUT/test_accel_cuda.log"

PYTHONPATH=/tmp/site timeout "$(left "$END")" python3 bench/flux_vs_kohya.py --sd-scripts .kohya/sd-scripts \
    --kohya-site /tmp/kohya-site --work /tmp/fluxbench --out "$OUT/flux_vs_kohya_h100_stream.json" \
    --ours R2,R1,R3,R1F,R2F --order R2,R1,R3,R1F,K24,K16,R2F --deadline "$(left $((END - 70)))" 2>&1 | tail -8
python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ours_log_tail'][-1500:])" \
    "$OUT/flux_vs_kohya_h100_stream.json" 2>/dev/null | grep -v "^captured"
echo "wall $(( $(date +%s) - T )) s"
