.PHONY: install test lint

# `make test` is the README's test command; CI runs it in a fresh venv after scripts/install.sh.
test:
	python -m pytest -q -p no:cacheprovider tests
	ruff check culturemert scripts tests benchmarks

install:
	bash scripts/install.sh
