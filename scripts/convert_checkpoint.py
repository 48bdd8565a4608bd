"""Convert a MERT checkpoint between fairseq .pt and HF folder; see culturemert/cli/convert_checkpoint.py."""

from culturemert.cli.convert_checkpoint import entry

if __name__ == "__main__":
    entry()
