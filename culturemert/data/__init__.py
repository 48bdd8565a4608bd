"""Data for pre-training: manifests, audio crops and batches."""
