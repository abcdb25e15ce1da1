# The GPU worker image: CUDA runtime, torch 2.13.0, TRL 1.16 with its vLLM extra, Triton.
# torch 2.13.0 and transformers 5.17 are the versions vllm 0.31 (TRL's newest allowed) pins.
# The torch and nvidia-* wheels bring their own CUDA libraries; the host's driver comes in
# through the NVIDIA container toolkit, so a plain Ubuntu base is enough.
FROM ubuntu:24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    build-essential git && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY workers ./workers
COPY trainers ./trainers
RUN pip install torch==2.13.0 && pip install '.[api,train,gpu,trackers]'
ENV POSTTRAIN_DATA_DIR=/data
# One worker per GPU; the worker's main process never touches CUDA.
CMD ["posttrain", "worker"]
