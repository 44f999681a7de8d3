# `make demo` and `make test` work on a fresh clone: the first run creates .venv and installs
# vistrain with its dev extras (torch==2.14.1 / torchvision==0.29.1 as pinned in pyproject.toml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo demo-classify test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vistrain.demo

demo-classify: $(STAMP)
	$(PY) -m vistrain.demo classify

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/classify.py

clean:
	rm -rf runs .pytest_cache
