#!/usr/bin/env bash
# Two worker processes on two local GPUs with the default settings (async EPLB, pynccl, metrics,
# control API): the GPU path of the whole worker service. Run on a machine with two GPUs.
set -euo pipefail
cfg=$(mktemp --suffix=.yaml)
cat > "$cfg" <<'YAML'
epSize: 2
steps: 600
device: cuda
model: {numExperts: 16, numLayers: 2, hiddenSize: 64, intermediateSize: 64, topK: 2, dtype: bfloat16}
eplb: {numRedundantExperts: 4, windowSize: 40, stepInterval: 50}
workload: {kind: drift, tokensPerStep: 128, driftPeriod: 100}
metrics: {port: 19400}
control: {port: 19390}
YAML
port=$((20000 + RANDOM % 20000))
for r in 0 1; do
  RANK=$r WORLD_SIZE=2 MASTER_PORT=$port python3 -m moe_worker --config "$cfg" > "${OUT:-/tmp}/smoke.rank$r.log" 2>&1 &
done
wait
tail -n 3 "${OUT:-/tmp}"/smoke.rank*.log
