# DCM for ComfyUI — developer entry points. Everything runs in ./.venv (made on first use).
#   make demo         sample the bundled toy world with the dual-expert sampler (CPU, < 1 min)
#   make test         all test tiers (unit; comfy when a ComfyUI work tree is found; browser; cli)
#   make test-browser the ComfyUI frontend in headless chromium (installs Debian chromium + npm playwright-core)
#   make test-cli     comfy-cli launch / run / stop against a real ComfyUI server
#   make bench        CPU benchmarks → bench/results/latest.json + markdown table
#   make reliability  fuzzed / hostile inputs and fault-injection suite, with figures
#   make soak         a live ComfyUI server under a long seeded queue (≥ 200 prompts, ≥ 50 interrupts, model files
#                     swapped under it, two websocket clients, RSS per run, bad /prompt requests) → tests/_output/soak/;
#                     `make test` runs its short form (tests/soak)
#   make toy-models   retrain the bundled toy teacher, DCM experts and baselines from scratch (+ the ablations) in
#                     runs/toy_v2; resumable: a killed build continues from its last checkpoints when re-run
#   make toy-eval     toy VBench of the bundle + the runs of toy-models: 64 prompt/seed pairs at 2/4/6 steps
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COMFYUI_PATH ?= $(HOME)/ComfyUI
export COMFYUI_PATH
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv test test-unit test-comfy test-browser test-cli demo bench reliability soak toy-models toy-eval lint clean

venv:
	@PYTHON=$(PYTHON) VENV=$(VENV) tools/bootstrap.sh

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-comfy: venv
	$(PY) -m pytest tests/comfy $(PYTEST_ARGS)

test-browser: venv
	$(PY) -m pytest tests/browser $(PYTEST_ARGS)

test-cli: venv
	$(PY) -m pytest tests/cli $(PYTEST_ARGS)

demo: venv
	$(PY) -m dcm_core demo $(DEMO_ARGS)

bench: venv
	$(PY) -m bench.run

reliability: venv
	$(PY) -m pytest tests/unit/reliability tests/comfy/reliability -p no:randomly -q -o addopts="--import-mode=importlib -p no:cacheprovider" --reliability-full $(PYTEST_ARGS)

soak: venv
	DCM_SOAK_FULL=1 $(PY) -m pytest tests/soak -q $(PYTEST_ARGS)

toy-models: venv
	OMP_NUM_THREADS=1 $(PY) -m dcm_core.toy.build --ablations

toy-eval: venv
	OMP_NUM_THREADS=1 $(PY) -m dcm_core.toy.evaluate

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache tests/_output demo_out
