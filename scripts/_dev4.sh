export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/worker:$PWD/tests
timeout 250 python3 bench/serve.py --shape qwen3-30b-a3b --layers 4 --device cuda --concurrency 8 64 256 --requests 64 --rounds 2 --prompt-words 32 --output-tokens 64 --eplb off on --redundant 16 --policy balanced --rebalance-every 2 --check-prompts 4 --loads-out $OUT/loads.json --machine h200 --out $OUT/serve.jsonl > $OUT/serve.out 2> $OUT/serve.err
echo "bench rc=$?"
