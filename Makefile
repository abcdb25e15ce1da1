# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install posttrain into it first (CPU torch 2.13.0).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= api,train,dev
REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: install demo test test-fast lint redis clean

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
	$(VENV)/bin/ruff check service workers trainers tests bench

clean:
	rm -rf $(VENV) posttrain-data
