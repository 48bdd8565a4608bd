"""Run an experiment, only what is missing; see culturemert/cli/experiment.py (--help)."""

from culturemert.cli.experiment import entry

if __name__ == "__main__":
    entry()
