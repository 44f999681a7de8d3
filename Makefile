# `make demo` and `make test` work on a fresh clone: the first run creates .venv and installs
# vistrain with its dev extras (torch==2.14.1 / torchvision==0.29.1 as pinned in pyproject.toml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# keyed on what decides the install (pyproject.toml and this file's install lines), so a change to either reinstalls
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: demo demo-classify demo-efficientdet test bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# yolov5 is a test oracle only (AGPL, never imported by vistrain): tests/test_yolov5_oracle.py. --no-deps keeps
# its pins (thop, ultralytics, ...) away from torch; the line before it is all its import chain needs
# (setuptools<81 for pkg_resources, still >= the 77.0.3 that torch asks for).
	$(PY) -m pip install --quiet --disable-pip-version-check 'pandas>=2,<4' 'seaborn==0.13.*' 'requests>=2.23' psutil 'setuptools>=77.0.3,<81'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps yolov5==7.0.14
	@$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vistrain.demo

demo-classify: $(STAMP)
	$(PY) -m vistrain.demo classify

demo-efficientdet: $(STAMP)
	$(PY) -m vistrain.demo efficientdet

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/classify.py

clean:
	rm -rf runs .pytest_cache
