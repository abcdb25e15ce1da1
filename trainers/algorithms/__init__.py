"""One module per post-training method; each exposes ``train(plan, reporter) -> dict``."""
