#!/bin/sh
# The runtime layer every posttrain image shares, whatever its base: Python 3 with venv
# (installed from the distribution when the base has none, as on the CUDA images), one
# unprivileged user whose uid is the same in every service, and the mount points it owns.
# Usage: runtime.sh UID
set -eu
uid="$1"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates
    apt-get clean
    rm -rf /var/lib/apt/lists/*
fi
# A uid taken by the base (ubuntu:24.04 ships 'ubuntu' as 1000) is refused here, loudly.
groupadd --gid "$uid" posttrain
useradd --uid "$uid" --gid "$uid" --create-home --home-dir /home/posttrain \
    --shell /usr/sbin/nologin posttrain
# /data: the data volume (a new named volume takes this owner); /models: base models, read-only.
mkdir -p /data /models
chown posttrain:posttrain /data
