# mixq pipelines. Every variable can be overridden: make awq MODEL=path/to/hf OUT=out/awq CALIB=data.jsonl
SHELL := /bin/bash
.DELETE_ON_ERROR:

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MIXQ := $(VENV)/bin/mixq
# the CPU wheel; on a CUDA machine use e.g. TORCH=torch==2.11.0 (or install torch into the venv first)
TORCH ?= torch==2.13.0
# llama.cpp's default build crashes in its AMX kernel on some CPUs; these flags build a portable AVX2 one
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: setup setup-llama-cpp test test-fast bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup-llama-cpp: $(VENV)/.llama-cpp

$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir "llama-cpp-python==0.3.36"
	touch $@

# the whole suite, slow real-model tests included (what CI runs)
test: $(VENV)/.installed $(VENV)/.llama-cpp
	$(PY) -m pytest -q -ra

# everything but the real-model tests
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -ra -m "not slow"

bench: $(VENV)/.installed
	$(PY) bench/convert.py

clean-venv:
	rm -rf $(VENV)
