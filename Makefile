# The README's two commands live here: `make serve` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every version the tests passed on; installs take them as constraints.
LOCK := requirements.lock
# The browser tests (tests/browser) drive Debian's Chromium through Playwright, whose own
# browser download needs the internet.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install upgrade serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) pip
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

# Move every dependency to its newest release, run the tests, and record the versions in the
# lock only if they pass (a failure leaves the lock as it was: `make clean install` goes back).
upgrade:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(BIN)/python -m pytest -q
	{ sed -n '1,2p' $(LOCK); echo "pip==$$($(BIN)/python -m pip --version | cut -d' ' -f2)"; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	touch $(STAMP)

# A file that fails to ingest is reported, and the server starts anyway.
serve: $(STAMP)
	-$(BIN)/rag ingest
	$(BIN)/rag serve

test: $(STAMP) $(CHROMIUM)
	$(BIN)/python -m pytest -q

# Installed only where it is missing (CI: a clean Debian machine, as root).
$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

bench: $(STAMP)
	$(BIN)/python bench/retrieval.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/formats.py
	$(BIN)/python bench/serve.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
