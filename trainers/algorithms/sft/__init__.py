"""Supervised fine-tuning on TRL's ``SFTTrainer`` (``method.py``)."""
