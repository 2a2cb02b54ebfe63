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

demo: $(STAMP)
	$(PY) -m ray_jobs.smoke --config configs/tiny/smoke.yaml

test: $(STAMP)
	@start=$$(date +%s); $(PY) -m pytest -q tests; rc=$$?; \
	echo "tests: $$(( $$(date +%s) - start )) s"; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) .cache
