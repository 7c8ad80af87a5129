export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/worker:$PWD/tests
timeout 280 python3 scripts/_prof_step.py > $OUT/prof.txt 2>&1; echo rc=$?
grep "decode step" $OUT/prof.txt
