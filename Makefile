.PHONY: demo install test

# The README's two commands. Both run in the active environment when culturemert is installed
# there, else in .venv, which scripts/ensure_env.sh creates and installs into on first use.
# The interpreter's folder goes first on PATH so that the tools the tests and the demo start
# (python, fairseq-hydra-train, torchrun) are that environment's too.

test:
	@py=$$(bash scripts/ensure_env.sh) && export PATH="$$(dirname $$py):$$PATH" && start=$$(date +%s) && \
	python -m pytest -q -p no:cacheprovider tests && \
	python -m ruff check culturemert scripts tests benchmarks && \
	echo "make test: the suite and the linter took $$(( $$(date +%s) - start )) s"

demo:
	@py=$$(bash scripts/ensure_env.sh) && export PATH="$$(dirname $$py):$$PATH" && python scripts/experiment.py configs/experiments/demo.yaml

install:
	@bash scripts/ensure_env.sh >/dev/null
