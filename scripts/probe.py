"""Probe frozen MERT models on tagging tasks; see culturemert/cli/probe.py.

python scripts/probe.py --help
"""
from culturemert.cli.probe import entry

if __name__ == "__main__":
    entry()
