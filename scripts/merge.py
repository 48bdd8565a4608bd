"""Merge MERT models in weight space; see culturemert/cli/merge.py (python scripts/merge.py --help)."""

from culturemert.cli.merge import entry

if __name__ == "__main__":
    entry()
