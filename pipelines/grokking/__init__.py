"""The grokking stage: modular arithmetic learnt by a tiny decoder (`config.py`, `stage.py`)."""
