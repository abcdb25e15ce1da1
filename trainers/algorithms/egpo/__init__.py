"""EGPO on posttrain's own trainer: the method (``method.py``), the extragradient trainer
(``trainer.py``) and its rollout engines (``rollout.py``)."""
