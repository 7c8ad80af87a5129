"""Profile the serving engine's decode steps in-process (temporary diagnosis script)."""
import os, sys, time, json
from pathlib import Path
import torch
sys.path.insert(0, "bench")
from serve import make_checkpoint, SHAPES
from moe_worker.config import WorkerConfig
from moe_worker.engine import create_engine
from moe_worker.serving.backend import SamplingParams

ck = Path("/tmp/q3p")
DEV = os.environ.get("DEV", "cuda"); SH = os.environ.get("SHAPE", "qwen3-30b-a3b")
DT = "bfloat16" if DEV == "cuda" else "float32"
make_checkpoint(ck, {**SHAPES[SH], "num_hidden_layers": 4}, DT, DEV)
E = SHAPES[SH]["num_experts"]
config = WorkerConfig.model_validate({
    "model": {"source": "checkpoint", "path": str(ck), "numExperts": E, "dtype": DT},
    "serving": {"enabled": True, "maxBatchTokens": 16384, "maxRunningRequests": 256, "maxWaitingRequests": 512},
    "eplb": {"enabled": os.environ.get("EPLB") == "1", "numRedundantExperts": int(os.environ.get("RED", 0))}, "device": DEV})
engine = create_engine(config, device=torch.device(DEV))
params = SamplingParams(max_new_tokens=100000, temperature=0, ignore_eos=True)
out = {}
for batch in (64, 256):
    for i in range(batch):
        engine.submit(f"{batch}-{i}", [int(t) for t in torch.randint(0, 256, (int(os.environ.get("PROMPT", 200)),))], params, lambda o: None)
    for _ in range(3):
        engine.step()  # prefill, then decodes
    (torch.cuda.synchronize() if DEV == "cuda" else None)
    times = []
    for _ in range(20):
        t = time.perf_counter(); engine.step(); (torch.cuda.synchronize() if DEV == "cuda" else None); times.append(time.perf_counter() - t)
    out[batch] = sorted(times)[10] * 1e3
    print(f"batch {batch}: decode step p50 {out[batch]:.1f} ms", flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA] if DEV == "cuda" else [ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
        (torch.cuda.synchronize() if DEV == "cuda" else None)
    print(prof.key_averages().table(sort_by="cuda_time_total" if DEV == "cuda" else "self_cpu_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)
    for i in range(batch):
        engine.abort(f"{batch}-{i}")
    engine.step()
