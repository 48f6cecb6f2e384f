#!/bin/bash
# The documented distillation chain of docs/skip-mode.md (shallow layers a -> a7w3, k = 3 of 6, about
# 4.5-5 CPU hours on 2 cores), then the table. Re-run it after an interruption: a finished step
# (its shallow.json exists) is skipped, a step with a checkpoint continues with --resume.
#   benchmarks/skip_distill_chain.sh [OUTDIR]        (default ./var)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-var}
V=${VBERT:-.venv/bin/vbert}
D=../shared/data
CORPUS=(--corpus $D/cls/sci-cite/train.txt --corpus $D/cls/rct-20k/train.txt --corpus $D/cls/chemprot/train.txt
        --corpus $D/ner/NCBI-disease/train.txt --corpus $D/ner/JNLPBA/train.txt --corpus $D/ner/JNLPBA/dev.txt
        --corpus $D/ner/JNLPBA/test.txt)
COMMON=("${CORPUS[@]}" --skip-layers 3 --final-weight 1 --threads 2 --no-progress)

step() {   # step NAME ARGS...: one distillation into $OUT/shallow-NAME
  local name=$1; shift
  local dir=$OUT/shallow-$name
  if [ -f "$dir/shallow.json" ]; then echo "[chain] $name done"; return; fi
  if [ -f "$dir/checkpoint.pt" ]; then
    echo "[chain] $name resumes ($(date -u +%FT%TZ))"; "$V" distill "${COMMON[@]}" "$@" --out "$dir" --resume
  else
    echo "[chain] $name starts ($(date -u +%FT%TZ))"; "$V" distill "${COMMON[@]}" "$@" --out "$dir"
  fi
}

step a --epochs 2 --attention-weight 1
prev=a
for n in a2 a3 a4; do
  step $n --epochs 1 --attention-weight 1 --attention-layers upper --init "$OUT/shallow-$prev"; prev=$n
done
for n in a5w3 a6w3 a7w3; do
  step $n --epochs 1 --attention-weight 3 --attention-layers upper --init "$OUT/shallow-$prev"; prev=$n
done
if [ ! -f "$OUT/table-a7w3.safetensors" ]; then
  echo "[chain] table starts ($(date -u +%FT%TZ))"
  "$V" build-table --shallow "$OUT/shallow-a7w3" "${CORPUS[@]}" --out "$OUT/table-a7w3.safetensors" --no-progress
fi
echo "[chain] done ($(date -u +%FT%TZ))"
