#!/usr/bin/env bash
# Regenerate every report and figure that quotes the embedded kedavra-shapes, from the model in the package: run it
# after the shipped model changes (the developers' guide: "regenerate every report and figure that quotes it").
#
#   bash scripts/refresh_embedded_reports.sh [THREADS]     # about 45 minutes on one thread of this project's CPU
#
# It writes the files below and prints the tables the docs quote; copying the printed figures into the docs is left to
# the person (what they say about the numbers needs a person). Outputs beside the docs: out/refresh/*.txt.
#   docs/reports/kedavra-shapes/{report.md,report.json,*.png}   kedavra evaluate (FID, KID, the sampler curve)
#   docs/reports/kedavra-shapes/adherence_{dpmpp_2m,euler}.json scripts/shapes_adherence.py (docs/embedded_model.md)
#   docs/figures/embedded_held_out.png                          the held-out grid of that run
#   docs/figures/viz/{reverse,attention,guidance,latents}.png   kedavra viz (docs/visualisations.md)
#   out/refresh/layout_probe.txt                              docs/embedded_model.md, "Position" (the shipped row)
#   out/refresh/step_cache.txt                                  docs/benchmark.md, "Step cache" (the adherence table)
#   out/refresh/few_step.txt                                    docs/samplers.md, the embedded model's few-step table
set -euo pipefail
threads="${1:-1}"
cd "$(dirname "$0")/.."
py=.venv/bin/python
kedavra=.venv/bin/kedavra
mkdir -p out/refresh
export OMP_NUM_THREADS="$threads"
step() { echo "== $(date +%T) $*" >&2; }

step "adherence, DPM++ 2M g5, held-out and seen, both wordings"
$py scripts/shapes_adherence.py --prompts held-out seen --phrasing canonical paraphrased --per-kind 200 \
    --json docs/reports/kedavra-shapes/adherence_dpmpp_2m.json --grid out/refresh/held \
    | tee out/refresh/adherence_dpmpp_2m.txt
cp out/refresh/held-held-out-canonical.png docs/figures/embedded_held_out.png

step "adherence, kedavra generate's defaults (Euler 20, g7.5)"
$py scripts/shapes_adherence.py --prompts held-out --phrasing canonical paraphrased --per-kind 200 --sampler euler \
    --guidance-scale 7.5 --json docs/reports/kedavra-shapes/adherence_euler.json \
    | tee out/refresh/adherence_euler.txt

step "layout probe: do position words move things"
$py scripts/shapes_layout_probe.py | tee out/refresh/layout_probe.txt

step "evaluate report (FID, KID, sampler curve)"
$kedavra evaluate kedavra-shapes --data shapes -n 500 --curve-images 40 --threads "$threads" \
    -o docs/reports/kedavra-shapes | tee out/refresh/evaluate.txt

step "visualisation figures"
prompt="a red circle above a blue square"
for kind in reverse attention guidance; do
    $kedavra viz "$kind" "$prompt" --model kedavra-shapes --precision fp32 -o "docs/figures/viz/$kind.png"
done
$kedavra viz latents --model kedavra-shapes --precision fp32 -o docs/figures/viz/latents.png
rm -f docs/figures/viz/*.gif  # the GIFs are for people, not for the repository

step "step cache on the embedded model"
$py scripts/benchmark_step_cache.py --threads "$threads" --skip-speed | tee out/refresh/step_cache.txt

step "few-step schedules on the embedded model"
$py scripts/few_step_schedules.py --per-kind 200 | tee out/refresh/few_step.txt
step "done: copy the printed tables (out/refresh/*.txt) into the docs that quote them"
