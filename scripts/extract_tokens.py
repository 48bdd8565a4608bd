"""Extract the EnCodec tokens of a manifest into a token cache; see culturemert/cli/extract_tokens.py.

python scripts/extract_tokens.py --help
"""
from culturemert.cli.extract_tokens import entry

if __name__ == "__main__":
    entry()
