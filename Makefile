# The two set-up commands of the README: `make demo` and `make test`. Both create and fill the
# virtual environment when it is missing or stale.
VENV ?= .venv
FLAVOR ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(FLAVOR)

# Caches stay inside the checkout, short paths for Ray's sockets.
export TOOLTUNE_CACHE ?= $(CURDIR)/.cache/tooltune
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm
export HF_HOME ?= $(CURDIR)/.cache/hf
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE ?= disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt cluster/install.sh
	bash cluster/install.sh $(VENV) $(FLAVOR)
	touch $@

# The local demo: SmolLM2-135M-Instruct evaluated, LoRA-trained for 60 steps, evaluated again.
DEMO_ARGS ?= train.max_steps=60 data.limit=240 evaluation.limit=30 output_dir=runs/demo resume=false

demo: $(STAMP)
	$(PY) -m ray_jobs.demo --config configs/smol/sft.yaml $(DEMO_ARGS)

test: $(STAMP)
	@start=$$(date +%s); $(PY) -m pytest -q --durations=25 tests; rc=$$?; \
	echo "tests: $$(( $$(date +%s) - start )) s"; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .cache
