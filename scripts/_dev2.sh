export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/worker:$PWD/tests PATH=/tmp/site/bin:$PATH COLUMNS=300
python3 -c "
import sys; sys.path.insert(0,'bench')
from serve import make_checkpoint, SHAPES
from pathlib import Path
make_checkpoint(Path('/tmp/q3'), {**SHAPES['qwen3-30b-a3b'],'num_hidden_layers':4}, 'bfloat16', 'cuda')
" >/dev/null 2>&1
printf 'model:\n  dtype: bfloat16\neplb:\n  enabled: false\n  numRedundantExperts: 0\nserving:\n  maxRunningRequests: 256\n  maxBatchTokens: 2048\n  maxWaitingRequests: 512\n' > /tmp/off.yaml
python3 -m moe_operator.cli serve /tmp/q3 --port 8123 --device cuda --config /tmp/off.yaml > $OUT/serve.log 2>&1 &
SP=$!
for i in $(seq 120); do grep -q "leader metrics" $OUT/serve.log && break; sleep 1; done
PID=$(pgrep -f "moe_worker --config" | head -1)
python3 -m moe_operator.cli bench-serve http://127.0.0.1:8123 --concurrency 64 --duration 8 --prompt-words 32 --output-tokens 64 > /dev/null 2>&1
for C in 64 256; do
python3 -m moe_operator.cli bench-serve http://127.0.0.1:8123 --concurrency $C --duration 25 --prompt-words 32 --output-tokens 64 --out $OUT/bs$C.json > $OUT/bs$C.log 2>&1 &
BP=$!
sleep 8
timeout 60 py-spy record -p $PID -d 12 -f raw -o $OUT/prof$C.txt --nonblocking > $OUT/pyspy$C.log 2>&1
timeout 60 py-spy record -p $PID -d 6 -f raw --idle -o $OUT/profidle$C.txt --nonblocking > /dev/null 2>&1
wait $BP
done
M=$(grep -o "http://127.0.0.1:[0-9]*/metrics" $OUT/serve.log)
curl -s $M > $OUT/metrics.txt
kill -INT $SP; wait $SP
