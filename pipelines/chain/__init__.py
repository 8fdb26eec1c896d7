"""Chains: stages in order, each from the previous one's model (`config.py`, `stage.py`)."""
