# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install posttrain into it first (CPU torch 2.13.0).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= api,train,trackers,dev
REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install demo test test-fast lint redis clean gpu-wheels deploy-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and by exact version, so nothing below can pull another build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP)

redis:
	@$(PY) -c "import redis,sys; redis.Redis.from_url('$(REDIS_URL)').ping()" 2>/dev/null \
	  || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no

demo: install
	$(VENV)/bin/posttrain demo

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not e2e"

lint: install
	$(VENV)/bin/ruff check service workers trainers tests bench deploy docker

# Builds the images and runs compose.yaml for real (README, "Development"): needs root (or
# the docker group), dockerd and mmdebstrap; not part of `make test`. DEPLOY_TEST_ARGS are
# passed on (python -m deploy --help).
deploy-test: install
	$(PY) -m pip install -q -e '.[deploy]'
	$(PY) -m deploy $(DEPLOY_TEST_ARGS)

# Wheels the GPU host lacks (README, "The GPU suite"): for CPython 3.12 on manylinux, no
# dependencies resolved (the host has torch, transformers, accelerate, peft, numpy...).
GPU_WHEELS ?= .gpu-wheels
GPU_WHEEL_PINS = trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
	pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
	typing-extensions==4.16.0 xxhash==3.6.0 liger-kernel==0.8.5

gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_17_x86_64 -d $(GPU_WHEELS) $(GPU_WHEEL_PINS)
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) posttrain-data
