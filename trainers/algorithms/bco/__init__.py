"""BCO on posttrain's own trainer: the method (``method.py``), the trainer (``trainer.py``)
and tokenisation, collation and UDM embeddings (``data.py``)."""
