# The two commands: `make book` and `make test`. Each bootstraps .venv itself.
PYTHON ?= python3
PYTEST_JOBS ?= auto
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.agm-runtime
TEST_STAMP    := $(VENV)/.agm-test

.PHONY: help book test data pytest smoke-book lint check-offline clean

help:
	@echo "make book           build the whole book into _build/html (full budgets)"
	@echo "make test           pytest + smoke build of the whole book (what CI runs)"
	@echo "make data           provision MNIST into data/MNIST/raw"
	@echo "make check-offline  open Chapter 1 in headless Chromium with networking off (needs chromium)"
	@echo "make lint           ruff over code/ and tests/"
	@echo "make clean          remove _build/ (keeps .venv and data)"

$(RUNTIME_STAMP): requirements.txt
	@echo "==> Preparing $(VENV) with requirements.txt (first run: several minutes, torch is large)"
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "error: $(PYTHON) is older than Python 3.10; run e.g. 'make PYTHON=python3.11 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "error: could not create $(VENV); install the venv module (Debian: apt install python3-venv)"; exit 1; }
	@$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -q -r requirements.txt || \
		{ echo "error: pip could not install requirements.txt; check access to PyPI, then run make again"; exit 1; }
	@# The agm package is the source tree itself (code/), put on the venv's path.
	@$(BIN)/python -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'agm-code.pth').write_text(str(pathlib.Path('code').resolve()) + '\n')"
	@$(BIN)/python -c "import agm, torch, torchvision; print('==> agm', agm.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__)"
	@touch $@

$(TEST_STAMP): $(RUNTIME_STAMP) requirements-test.txt
	@echo "==> Installing test dependencies (requirements-test.txt)"
	@$(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -q -r requirements-test.txt || \
		{ echo "error: pip could not install requirements-test.txt; check access to PyPI, then run make again"; exit 1; }
	@touch $@

data: $(RUNTIME_STAMP)
	@echo "==> Provisioning MNIST (python -m agm data)"
	@$(BIN)/python -m agm data

book: data
	@echo "==> Building the book with full budgets into _build/html"
	@$(BIN)/python -m agm.book build

pytest: $(TEST_STAMP) data
	@echo "==> Running pytest ($(PYTEST_JOBS) workers)"
	@$(BIN)/python -m pytest -n $(PYTEST_JOBS) --dist worksteal --durations=25

smoke-book: data
	@echo "==> Smoke build of the whole book (AGM_SMOKE=1, warnings are errors) into _build/smoke"
	@$(BIN)/python -m agm.book build --smoke

test: pytest smoke-book
	@echo "==> make test: all green"

lint: $(TEST_STAMP)
	@$(BIN)/ruff check code tests

check-offline: $(RUNTIME_STAMP)
	@$(BIN)/python -m agm.book check-offline

clean:
	rm -rf _build
