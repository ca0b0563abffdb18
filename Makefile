# Two entry points (see README): `make app` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: app test test-quick model chromium turbojpeg clean-venv

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

app: $(STAMP)
	$(PY) app.py $(ARGS)

# Re-create the shipped default model (weights/lgffem-default.safetensors) from ../shared/data:
# the recipe of weights/README.md on the LC25000 lung + colon galleries (about 70 min on 2 CPU cores).
DATA ?= ../shared/data
MODEL_OUT ?= artifacts/default-model
model: $(STAMP)
	$(PY) -m train --dataset $(DATA)/lc25000_lung/gallery $(DATA)/lc25000_colon/gallery \
	  --epochs 10 --t0 10 --distill-mode mse --distill-weight 1000 --global-weight 0.75 --threads 2 \
	  --output-dir $(MODEL_OUT) --checkpoint-dir $(MODEL_OUT)-checkpoints \
	  --model-name lgffem-lite0-lc25000 --license other --tags lc25000 lung colon $(ARGS)
	$(PY) -m train.export_default $(MODEL_OUT)

# Debian's Chromium for the browser test (Playwright drives it; no browser download).
chromium:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Debian's libturbojpeg for wsidicomizer (the DICOM tests convert the dev SVS to a DICOM series).
turbojpeg:
	@[ -e /usr/lib/x86_64-linux-gnu/libturbojpeg.so.0 ] || ldconfig -p 2>/dev/null | grep -q libturbojpeg || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libturbojpeg0 >/dev/null; }

# Lint and format check first (ruff, configured in pyproject.toml), then the tests.
test: $(STAMP) chromium turbojpeg
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

# The suite without the Chromium tests (a quick check while editing; `make test` runs them all).
test-quick: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow and not gpu and not browser" $(ARGS)

clean-venv:
	rm -rf $(VENV)
