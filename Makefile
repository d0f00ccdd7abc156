# Two commands set everything up on a fresh clone: `make test` and `make bench`.
# Each creates .venv on first use and installs the project (editable) with the extras it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test bench bench-results tune aot gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23" "setuptools>=64" wheel

# The install builds the CPU path's C loop (focal_triton/cpu/negatives.c) in place: rebuilt when it changes.
$(VENV)/.installed-test: pyproject.toml focal_triton/cpu/negatives.c | $(PY)
	$(PY) -m pip install -e ".[test,integrations]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml focal_triton/cpu/negatives.c | $(PY)
	$(PY) -m pip install -e ".[bench]"
	touch $@

# The whole suite. Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 so the Triton kernels run on CPU.
test: $(VENV)/.installed-test
	$(VENV)/bin/pytest -q

# The main job: the benchmark suite on this machine's GPU (or its CPU without one); table, CSV, JSON and plots
# under bench/local/ (untracked), named by device, and the goals checked (README "Speed").
bench: $(VENV)/.installed-bench
	$(PY) bench/run.py

# The same, written to the committed bench/results/ (what README shows).
bench-results: $(VENV)/.installed-bench
	$(PY) bench/run.py --out bench/results

# Pre-tune the kernels for common detector shapes on this GPU (a no-op without CUDA).
tune: $(VENV)/.installed-bench
	$(PY) -m focal_triton.tune

# Ahead-of-time compile checks of every kernel specialization for sm_80 and sm_90 (no GPU needed; `make test` checks
# a representative subset): tests/test_aot.py on the whole matrix. The printed report: .venv/bin/python -m
# focal_triton.aot (--subset, --per-logit --sass-dir DIR).
aot: $(VENV)/.installed-test
	FOCAL_TRITON_AOT=full $(VENV)/bin/pytest -q tests/test_aot.py

# The GPU check (bench/gpu_check.py; docs/gpu-check.md): tests, smoke set, CUDA graphs, torch.compile, memcheck,
# tuning and a quick benchmark on this machine's GPU in about 7 minutes, report in gpu-report/. Flags through ARGS
# (ARGS=--dry-run lists the steps; --budget S, --report DIR). It installs nothing and creates no venv: it runs with
# .venv's Python where that has torch, else with $(PYTHON) (a GPU box's, torch with CUDA preinstalled); set
# GPU_PYTHON=... to choose. Without CUDA it says so and exits 0.
GPU_PYTHON ?= $(shell $(PY) -c "import torch" >/dev/null 2>&1 && echo $(PY) || echo $(PYTHON))
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis gpu-report focal_triton/cpu/_negatives*.so
