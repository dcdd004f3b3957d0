# Every target works from a fresh clone: the virtual environment is created and filled on demand.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-fast lint typecheck demo bench clean mutate

$(STAMP): pyproject.toml requirements-test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned to the CPU build that lies on disk; a looser spec pulls a multi-GB CUDA wheel.
	$(BIN)/pip install -q -r requirements-test.txt
	# strict editable mode: mypy and the runtime both resolve the folders mapped into ckptd.*
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $(STAMP)

venv: $(STAMP)

# Re-link the strict editable install after adding or removing modules.
relink: $(STAMP)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

test: $(STAMP)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ckptd format converters api training tests benchmarks
	# from outside the checkout: ./ckptd would otherwise hide the folders mapped into ckptd.*
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
mutate: $(STAMP)
	rm -f $(MUTATE_SOCK); nice -n 19 $(BIN)/python tests/forkrun.py serve $(MUTATE_SOCK) $(subst $(comma), ,$(MUTATE_PATHS)) & \
	  while [ ! -S $(MUTATE_SOCK) ]; do sleep 1; done; \
	  nice -n 19 $(BIN)/mutmut run --paths-to-mutate "$(MUTATE_PATHS)" --no-progress --runner \
	  "$(CURDIR)/$(BIN)/python tests/forkrun.py run $(MUTATE_SOCK) -- -x -q -p no:randomly -p no:cacheprovider -m 'not slow and not s3 and not gpu and not distributed' -k '$(MUTATE_K)' $(MUTATE_TESTS)"; \
	  $(BIN)/python tests/forkrun.py stop $(MUTATE_SOCK); true
	$(BIN)/mutmut results

demo: $(STAMP)
	$(BIN)/python -m ckptd.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache demo-run
