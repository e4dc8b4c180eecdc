# `make test` from a fresh clone: creates $(VENV) if missing, installs the package with its test
# dependencies and torchscale 0.3.0 (for the parity tests), then runs the whole suite.
#   make test PYTEST_ARGS="tests/test_model.py -x"   # a part of it
#   make test VENV=/tmp/venv                          # another environment

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: test install

test: $(VENV)/.installed
	@# pytest exits 5 when it collects no test: a failure here, never a pass.
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

install: $(VENV)/.installed

# Installed again only when pyproject.toml changes. torch first, so that the extras take it as it is
# (the CPU build is enough); torchscale and fairscale with --no-deps, because their pins pull in timm
# and torchvision, which the code paths used here never import.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,torchscale]"
	$(BIN)/python -m pip install -q --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
	@$(BIN)/python -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|numpy|torch|torchscale) " || true
	touch $@
