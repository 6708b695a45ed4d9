# The two commands of the README. Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed before the package so pip never resolves an unpinned torch (a multi-GB CUDA build).
# A torch already in the venv (a GPU user's CUDA build) is kept. Override for another CPU wheel source:
#   make test TORCH_SPEC=torch==2.13.0 TORCH_PIP_ARGS="--index-url <your CPU wheel index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# make test spreads the suite over xdist workers, one per core up to 4, on machines with more than 2 cores (each worker
# loads torch once; many tests start pytest in a fresh process of their own). On 2 cores one process is faster (measured:
# 135 s serially against 179-201 s on 2 workers), so it runs in one. PYTEST_XDIST= forces one process, or sets the flags.
NPROC := $(shell nproc 2>/dev/null || echo 1)
PYTEST_XDIST ?= $(if $(filter 1 2,$(NPROC)),,--numprocesses=auto --maxprocesses=4 --dist=worksteal)
DEMO_REPORT ?= reports/demo

.PHONY: demo test bench bench-gpu docs venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,report,docs]"
	touch $@

demo: venv
	$(PY) -m pytest examples -v -rA --nnsight-report $(DEMO_REPORT) $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "make demo: no example ran" >&2; \
	  test -f $(DEMO_REPORT)/index.html && echo "make demo: findings report in $(DEMO_REPORT)/index.html"; exit $$rc; }
	@echo "make demo: findings report in $(DEMO_REPORT)/index.html (findings.json, findings.md, figures/)"

test: venv
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS) || { rc=$$?; [ $$rc -eq 5 ] && echo "make test: pytest collected no tests, which counts as a failure" >&2; exit $$rc; }

# the documentation site, strict: a broken link, a missing page in the nav or a bad docstring reference fails
docs: venv
	$(PY) -m mkdocs build --strict --site-dir site

# bench needs the optional `bench` extra (TransformerLens 4.x) for its side-by-side entry; it is installed here.
# ruff (pip install ruff) with the pyproject configuration, over the whole tree; LINT_PATHS narrows it (e.g. the files a change touches)
LINT_PATHS ?= .
lint: venv
	$(PY) -m ruff --version >/dev/null 2>&1 || $(PY) -m pip install --quiet "ruff>=0.6"
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

bench: venv
	$(PY) -c "import transformer_lens" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]"
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/run.py

# on a CUDA machine (a CUDA build of torch in .venv): the side-by-side benchmark in fp32 and bf16 and the examples on CUDA
bench-gpu: venv
	$(PY) -c "import transformer_lens" 2>/dev/null || $(PY) -m pip install --quiet -e ".[bench]"
	OMP_WAIT_POLICY=PASSIVE timeout 600 $(PY) benchmarks/gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist site *.egg-info
