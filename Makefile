.PHONY: demo install test

# The README's two commands. `make test` is what CI runs in a fresh venv after scripts/install.sh;
# `make demo` creates .venv and installs into it first when no environment with culturemert is active.
VENV_PYTHON := .venv/bin/python

test:
	python -m pytest -q -p no:cacheprovider tests
	ruff check culturemert scripts tests benchmarks

demo:
	@if python -c "import culturemert" 2>/dev/null; then \
		python scripts/demo.py; \
	else \
		[ -x $(VENV_PYTHON) ] || python3 -m venv .venv; \
		$(VENV_PYTHON) -c "import culturemert" 2>/dev/null || PYTHON=$(VENV_PYTHON) bash scripts/install.sh; \
		PATH="$(CURDIR)/.venv/bin:$$PATH" $(VENV_PYTHON) scripts/demo.py; \
	fi

install:
	bash scripts/install.sh
