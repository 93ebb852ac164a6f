# Two entry points, each doing the whole set-up on a fresh machine:
#   make demo   - the two-stage pipeline on the embedded tiny LTX-2 model (mp4 + JSON report)
#   make test   - the test suite (the command CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test lint venv clean

venv: $(VENV)/.installed

# torch first: a torch already importable by $(PYTHON) (e.g. a GPU image's CUDA build) is kept
# by giving the venv the system site-packages; otherwise the CPU wheel is installed.
# Then the project with the pipeline (the demo and most tests need it) and the test tools, and
# sglang for the sglang integration's tests (without its own requirements, which pin a CUDA torch).
$(VENV)/.installed: pyproject.toml constraints.txt tests/requirements-sglang.txt
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "keeping the existing torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV) && $(PY) -m pip install --quiet "$(TORCH_CPU)"; \
	fi
	$(PY) -m pip install --quiet -c constraints.txt -e ".[pipeline,test]"
	$(PY) -m pip install --quiet --no-deps -r tests/requirements-sglang.txt
	@touch $@

demo: venv
	$(VENV)/bin/ltx2 generate --preset tiny

test: venv
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV)
