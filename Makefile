# Two set-up commands: `make demo` (the whole pipeline on built-in defaults) and `make test`.
# Bring your own environment with `make PYTHON=/path/to/python ...` (then nothing is installed).
VENV       := .venv
PYTHON     ?= $(VENV)/bin/python
ifeq ($(PYTHON),$(VENV)/bin/python)
ENV_READY  := $(VENV)/.installed
else
ENV_READY  :=
endif
PYTEST_ARGS ?=
DEEPSPEED  := $(PYTHON) -m deepspeed.launcher.runner

.PHONY: env test test-fast prep base train clean

env: $(ENV_READY)

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: $(ENV_READY)
	$(PYTHON) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(ENV_READY)
	$(PYTHON) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

prep: $(ENV_READY)
	$(PYTHON) -m data_prep --config configs/prep/default.yaml

base: prep
	$(PYTHON) launch/base.py --config configs/base/default.yaml

# The built-in default on CPU: 2 ranks under ZeRO-3 (gloo). On GPUs drop --num_gpus to use them all.
train: base
	$(DEEPSPEED) --num_gpus 2 launch/train.py --deepspeed ds_configs/zero3.json --config configs/train/default.yaml

clean:
	rm -rf runs outputs data/built
