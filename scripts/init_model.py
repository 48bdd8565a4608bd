"""A random MERT checkpoint; see culturemert/cli/init_model.py (python scripts/init_model.py --help)."""
from culturemert.cli.init_model import entry

if __name__ == "__main__":
    entry()
