#!/usr/bin/env bash
# The paper's study at ImageNet scale, from the command line: cache SD-VAE latents, train full attention and
# the mediator models (or take given checkpoints), record redundancy, derive schedules, sample static, derived
# and adaptive runs with guidance, score all five ADM metrics, and tabulate them beside their GFLOPs.
#
#   DATA=/data/imagenet/train VAE=/models/sd-vae-ft-ema REF=/data/VIRTUAL_imagenet256_labeled.npz \
#   INCEPTION=/models/weights-inception-2015-12-05-6726825d.pth NPROC=8 bash scripts/imagenet_study.sh
#
# Every step is an `attnmed` command that resumes where it stopped, so rerunning the script continues it.
# Settings (environment variables; the defaults are the papers'):
#   OUT runs/imagenet-study   MODEL SiT-S/2   IMAGE_SIZE 256   COUNTS "4 16 64" (and full attention)
#   TRAIN_STEPS 400000   BATCH 256   RECORD_SAMPLES 32   STEPS 250 (SDE evaluations)   CFG 1.5
#   FID_SAMPLES 50000   SAMPLE_BATCH 125   RHO "0.9 0.8" (the adaptive rule's ρ, one per switch of the COUNTS trio;
#   a grid choice: the paper's values are unpublished)
#   NPROC 1 (GPUs per node, for torchrun)   LATENTS $OUT/latents (an existing cache skips the encoding)
#   CKPT_FULL, CKPT_4, CKPT_16, ... : existing checkpoints to use instead of training (e.g. CKPT_FULL=SiT-S-2.pt)
#   GRAFT_FROM: a trained full-attention network to graft the mediators onto instead of training them: an attnmed
#     checkpoint, a diffusers DiT folder, or an official DiT/SiT file with SOURCE_ARGS="--model DiT-XL/2
#     --input-size 32". One network serving the COUNTS is grafted from it and distilled for GRAFT_LAYER_STEPS
#     layer-wise steps (default 500, on source trajectories of GRAFT_TRAJECTORY_STEPS, default 50) and GRAFT_STEPS
#     end-to-end steps on the latents (default 8000, 2% of 400K; GRAFT_BATCH images each, default BATCH); that one
#     file then serves every count, the derived schedules (over the COUNTS) and the adaptive rule (the COUNTS trio,
#     RHO as above). The source itself is the full-attention run.
set -euo pipefail
: "${DATA:?set DATA to an ImageFolder tree (or LATENTS to a finished latent cache)}" "${VAE:?set VAE}"
: "${REF:?set REF to an ADM reference batch .npz}" "${INCEPTION:?set INCEPTION to the local Inception .pth}"
OUT=${OUT:-runs/imagenet-study}; MODEL=${MODEL:-SiT-S/2}; IMAGE_SIZE=${IMAGE_SIZE:-256}; COUNTS=${COUNTS:-"4 16 64"}
TRAIN_STEPS=${TRAIN_STEPS:-400000}; BATCH=${BATCH:-256}; RECORD_SAMPLES=${RECORD_SAMPLES:-32}; STEPS=${STEPS:-250}
CFG=${CFG:-1.5}; FID_SAMPLES=${FID_SAMPLES:-50000}; SAMPLE_BATCH=${SAMPLE_BATCH:-125}; RHO=${RHO:-"0.9 0.8"}
NPROC=${NPROC:-1}; LATENTS=${LATENTS:-$OUT/latents}
GRAFT_FROM=${GRAFT_FROM:-}; GRAFT_LAYER_STEPS=${GRAFT_LAYER_STEPS:-500}; GRAFT_STEPS=${GRAFT_STEPS:-8000}
GRAFT_BATCH=${GRAFT_BATCH:-$BATCH}; GRAFT_TRAJECTORY_STEPS=${GRAFT_TRAJECTORY_STEPS:-50}; read -r -a source_args <<< "${SOURCE_ARGS:-}"
attnmed=${ATTNMED:-attnmed}
python=${PYTHON:-$(dirname "$(command -v "$attnmed")")/python}
if [ "$NPROC" -gt 1 ]; then launch=(torchrun --nproc_per_node "$NPROC" -m analysis.cli); else launch=("$attnmed"); fi
mkdir -p "$OUT"
say() { echo "[$(date +%H:%M:%S)] $*" >&2; }

say "latents of $DATA -> $LATENTS"
[ -f "$LATENTS/meta.json" ] || "$attnmed" cache-latents --data "$DATA" --image-size "$IMAGE_SIZE" --vae "$VAE" --out "$LATENTS"

checkpoint() {  # the final checkpoint of one variant: given, or trained here (resumable)
  local name=$1 given_var="CKPT_${1^^}"; shift
  if [ -n "${!given_var:-}" ]; then echo "${!given_var}"; return; fi
  local run="$OUT/train/$name" final
  final="$run/checkpoints/$(printf %07d "$TRAIN_STEPS").pt"
  if [ ! -f "$final" ]; then
    say "train $name"
    local resume=(); [ -d "$run/checkpoints" ] && resume=(--resume)
    "${launch[@]}" train --model "$MODEL" "$@" --data "$LATENTS" --batch-size "$BATCH" --steps "$TRAIN_STEPS" \
      --no-progress --out "$run" "${resume[@]}" >&2
  fi
  echo "$final"
}
declare -A ckpt count_args
if [ -n "$GRAFT_FROM" ]; then  # one grafted network serves every count: pick each with --mediators
  shared="$OUT/graft/end_to_end/shared/checkpoints/$(printf %07d "$GRAFT_STEPS").pt"
  if [ ! -f "$shared" ]; then
    say "graft mediators $COUNTS onto $GRAFT_FROM and distill"
    # shellcheck disable=SC2086
    "${launch[@]}" graft --ckpt "$GRAFT_FROM" "${source_args[@]}" --mediators $COUNTS --shared \
      --distill-steps "$GRAFT_LAYER_STEPS" --end-to-end-steps "$GRAFT_STEPS" --batch-size "$GRAFT_BATCH" \
      --data "$LATENTS" --steps "$GRAFT_TRAJECTORY_STEPS" --no-progress --out "$OUT/graft" >&2
  fi
  ckpt[full]=$GRAFT_FROM; count_args[full]="${source_args[*]}"
  for n in $COUNTS; do ckpt[$n]=$shared; count_args[$n]="--mediators $n"; done
  all_ckpts=(--ckpt "$shared"); adaptive_ckpts=(--ckpt "$shared"); schedule_counts="$COUNTS"
else
  ckpt[full]=$(checkpoint full)
  for n in $COUNTS; do ckpt[$n]=$(checkpoint "$n" --attention mediator --mediators "$n"); done
  all_ckpts=(--ckpt "${ckpt[full]}"); for n in $COUNTS; do all_ckpts+=(--ckpt "${ckpt[$n]}"); done
  adaptive_ckpts=(); for n in $COUNTS; do adaptive_ckpts+=(--ckpt "${ckpt[$n]}"); done  # the paper's trio
  schedule_counts="$COUNTS full"
fi

if [ ! -f "$OUT/redundancy.parquet" ]; then
  say "record redundancy of full attention"
  # shellcheck disable=SC2086
  "${launch[@]}" record --ckpt "${ckpt[full]}" ${count_args[full]:-} --steps "$STEPS" --cfg-scale "$CFG" --samples "$RECORD_SAMPLES" \
    --metrics all --out "$OUT/redundancy.parquet"
fi
"$attnmed" plot "$OUT/redundancy.parquet" --out "$OUT/figures" >/dev/null
# shellcheck disable=SC2086
for tau in 0.9 0.99; do
  "$attnmed" schedule "$OUT/redundancy.parquet" --counts $schedule_counts --tau "$tau" --out "$OUT/schedule-rank$tau.json"
done

sample() {  # name, then the checkpoint and switching arguments
  local name=$1; shift
  say "sample $name"
  "${launch[@]}" sample "$@" --steps "$STEPS" --cfg-scale "$CFG" --num-samples "$FID_SAMPLES" \
    --batch-size "$SAMPLE_BATCH" --vae "$VAE" --out "$OUT/samples/$name"
  local scores="$OUT/samples/$name/adm.json"
  if [ ! -f "$scores" ]; then  # written whole or not at all
    "$attnmed" evaluate "$OUT/samples/$name/samples.npz" --reference "$REF" --adm --inception-weights "$INCEPTION" \
      > "$scores.tmp"
    mv "$scores.tmp" "$scores"
  fi
}
# shellcheck disable=SC2086
sample full --ckpt "${ckpt[full]}" ${count_args[full]:-}
# shellcheck disable=SC2086
for n in $COUNTS; do sample "med$n" --ckpt "${ckpt[$n]}" ${count_args[$n]:-}; done
for tau in 0.9 0.99; do sample "derived-rank$tau" "${all_ckpts[@]}" --schedule "$OUT/schedule-rank$tau.json"; done
sample adaptive "${adaptive_ckpts[@]}" --adaptive --rho $RHO

say "tabulate"
"$python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
lines = ["| run | GFLOPs / image | FID | sFID | IS | precision | recall |", "|---|---|---|---|---|---|---|"]
for folder in sorted((out / "samples").iterdir()):
    cost, adm = folder / "samples.json", folder / "adm.json"
    if cost.exists() and adm.exists():
        c, m = json.loads(cost.read_text()), json.loads(adm.read_text())
        lines.append(f"| {folder.name} | {c['gflops_per_image']:.4g} | {m['fid']:.3f} | {m['sfid']:.3f} | "
                     f"{m['inception_score']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} |")
(out / "RESULTS.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
