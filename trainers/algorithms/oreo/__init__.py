"""OREO on posttrain's own trainer: the method (``method.py``), the trainer (``trainer.py``),
tokenisation (``data.py``), the value model (``value.py``) and value-guided search
(``search.py``)."""
