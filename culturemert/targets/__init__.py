"""Teacher targets of the MERT objective: EnCodec tokens and CQT frames."""
