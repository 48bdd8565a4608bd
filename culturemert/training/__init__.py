"""Running continual pre-training (thesis 3.3): the composed stage configs, the start
checkpoint, the run folder's fingerprint and lock, and the launcher behind scripts/run_cpt.sh."""
