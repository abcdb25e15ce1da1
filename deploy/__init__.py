"""``make deploy-test``: build posttrain's images, start compose.yaml and use it for real.

Not part of ``make test``: it needs root (or the docker group), a Docker daemon and a few
minutes. ``python -m deploy --help`` lists its options.
"""
