"""The thesis's evaluation as one experiment: a YAML file (`config`), the steps it needs in order
(`plan`), each run only when its inputs changed (`steps`), and the tables and figures of chapter 4
(`report`, `tables`, `figures`, `logs`); ``python scripts/experiment.py EXPERIMENT.yaml``."""
