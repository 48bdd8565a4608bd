"""Segments and manifests of a run; see culturemert/cli/prepare_data.py (--help)."""

from culturemert.cli.prepare_data import entry

if __name__ == "__main__":
    entry()
