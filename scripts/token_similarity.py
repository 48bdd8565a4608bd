"""Token-level similarity between datasets; see culturemert/cli/token_similarity.py.

python scripts/token_similarity.py --help
"""
from culturemert.cli.token_similarity import entry

if __name__ == "__main__":
    entry()
