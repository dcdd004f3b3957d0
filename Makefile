# Every target works from a fresh clone: the virtual environment is created and filled on demand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv link relink test test-fast test-slow lint typecheck demo bench clean mutate lock

# Dependencies come pinned from requirements.lock (a constraints file: `make lock` refreshes it),
# so nothing backtracks. uv installs them (in parallel: pip took over 15 minutes for the same set
# on this loaded machine, uv about one); pip is the fallback when uv cannot be had.
# torch is pinned to the 2.13.0 CPU build, found through pip's find-links ($PIP_FIND_LINKS).
UV_VERSION ?= 0.13.9
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
$(STAMP): pyproject.toml requirements-test.txt requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	($(BIN)/pip install -q uv==$(UV_VERSION) && $(BIN)/uv pip install -q --python $(BIN)/python \
	  $(FIND_LINKS) -c requirements.lock -r requirements-test.txt) \
	|| $(BIN)/pip install -q -c requirements.lock -r requirements-test.txt
	rm -f $(LINKED)
	touch $(STAMP)

venv: $(STAMP)

# The strict editable install links every file of the package one by one (mypy and the runtime
# both resolve the folders mapped into ckptd.*), so it is redone when files are added, removed or
# renamed, or pyproject.toml changes -- not on every run.
LINKED := $(VENV)/.linked
PACKAGE_FILES = find src format converters api training migrations -type f \
	-not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort
link: $(STAMP)
	@$(PACKAGE_FILES) > $(LINKED).new
	@if [ $(LINKED) -nt pyproject.toml ] && cmp -s $(LINKED).new $(LINKED); then rm $(LINKED).new; else \
	  echo "make: linking the package (strict editable install)"; \
	  $(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict \
	  && mv $(LINKED).new $(LINKED); fi

# Force a re-link (e.g. after a failed one).
relink: $(STAMP)
	rm -f $(LINKED)
	$(MAKE) link

# The test command: everything that runs on this machine except the long campaigns (`slow`,
# `make test-slow`). PostgreSQL is started for the run when its binaries are installed and
# CKPTD_TEST_POSTGRES_URL is unset; the browser test runs when /usr/bin/chromium exists.
test: link
	bash .ci/services/with-postgres.sh $(BIN)/python -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

test-slow: link
	bash .ci/services/with-postgres.sh $(BIN)/python -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

# Refresh requirements.lock: the newest versions the requirements allow, keeping the current pins
# where they still fit (delete the file first to move every pin). Needs the network.
lock: $(STAMP)
	test -x $(BIN)/uv || $(BIN)/pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile -q --python-version 3.11 $(FIND_LINKS) requirements-test.txt -o requirements.lock

test-fast: test

lint: link
	$(BIN)/ruff check src format converters api training tests benchmarks
	# from outside the checkout: mypy resolves ckptd through the strict editable install there
	cd /tmp && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p ckptd

typecheck: lint

# Mutation testing (docs/mutation.md): mutmut mutates MUTATE_PATHS in place, one mutant at a time,
# and runs the fast tests that cover them. Never run other tests in this checkout meanwhile.
comma := ,
MUTATE_PATHS ?= format/shard.py
MUTATE_TESTS ?= tests/format/test_shard_layout.py
MUTATE_K ?=
MUTATE_SOCK := $(CURDIR)/.mutmut-fork.sock
# A fork server (tests/forkrun.py) imports torch once; each mutant's pytest is a fork of it.
mutate: link
	rm -f $(MUTATE_SOCK); nice -n 19 $(BIN)/python tests/forkrun.py serve $(MUTATE_SOCK) $(subst $(comma), ,$(MUTATE_PATHS)) & \
	  while [ ! -S $(MUTATE_SOCK) ]; do sleep 1; done; \
	  nice -n 19 $(BIN)/mutmut run --paths-to-mutate "$(MUTATE_PATHS)" --no-progress --runner \
	  "$(CURDIR)/$(BIN)/python tests/forkrun.py run $(MUTATE_SOCK) -- -x -q -p no:randomly -p no:cacheprovider -m 'not slow and not s3 and not gpu and not distributed' -k '$(MUTATE_K)' $(MUTATE_TESTS)"; \
	  $(BIN)/python tests/forkrun.py stop $(MUTATE_SOCK); true
	$(BIN)/mutmut results

demo: link
	$(BIN)/python -m ckptd.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache demo-run
