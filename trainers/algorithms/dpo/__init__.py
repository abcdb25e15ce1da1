"""Direct preference optimisation on TRL's ``DPOTrainer`` (``method.py``)."""
