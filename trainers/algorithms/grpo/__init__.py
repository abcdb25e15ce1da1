"""The GRPO family on TRL's ``GRPOTrainer``: the method (``method.py``), the trainer with
posttrain's pieces plugged in (``trainer.py``) and the pieces' configuration (``pieces.py``)."""
