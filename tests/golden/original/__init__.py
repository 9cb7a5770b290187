"""Golden values produced by the original VCT implementation (see regenerate.py)."""
