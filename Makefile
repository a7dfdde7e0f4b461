# `make demo` and `make test` do all set-up themselves on a fresh machine (Python 3.11, no GPU).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv browser demo compare test test-unit test-gpu lint format docs bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: takes the CPU wheel where one is provided, the CUDA build elsewhere.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

TINY_HUB := .cache/tiny-hub
# The demo's comparison: one preset of each kind (a distilled UNet, a LoRA, Turbo's one step);
# `make compare` runs every kind, SDXL base's 30 steps included (some minutes on a CPU).
DEMO_PRESETS := lightning-4step,lcm-lora,turbo
COMPARE_PRESETS := sdxl-base,lightning-4step,lightning-lora-4step,lcm-lora,turbo,hyper-sd-2step
COMPARE = HF_HUB_CACHE=$(TINY_HUB) HF_HUB_OFFLINE=1 $(BIN)/sdxl-batch compare \
	--manifest configs/manifests/lightning-benchmark.parquet --set generation.width=128 --set generation.height=128

demo: venv
	$(BIN)/sdxl-batch run configs/demo.yaml
	@echo "Side-by-side comparison of three presets, from tiny stand-ins under their real hub names (offline; all of them: make compare):"
	TRANSFORMERS_VERBOSITY=error $(BIN)/python -m pipeline.models.tiny $(TINY_HUB) >/dev/null
	$(COMPARE) --presets $(DEMO_PRESETS) --output outputs/demo-compare
	@echo "The demo job's report (open it in a browser):"
	$(BIN)/sdxl-batch report outputs/demo

compare: venv
	TRANSFORMERS_VERBOSITY=error $(BIN)/python -m pipeline.models.tiny $(TINY_HUB) >/dev/null
	$(COMPARE) --presets $(COMPARE_PRESETS) --output outputs/compare

# Headless Chromium for the report's browser test (tests/integration/test_report_browser.py), which
# skips itself without it (and fails on CI). Debian's packages, installed only when missing.
browser:
	@if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" -ne 0 ]; then \
		echo "make browser: chromium or chromedriver is missing, and installing them needs root:"; \
		echo "  sudo apt-get update && sudo apt-get install -y chromium chromium-driver"; \
		echo "  (without them the report's browser test is skipped)"; \
	else \
		apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver; \
	fi

# Every test, on every core: the integration tests (Ray clusters, servers, CLI processes) run one
# after another in two lanes, one per worker, and the other tests fill in (tests/conftest.py).
test: venv browser
	$(BIN)/pytest -q -n auto --dist loadgroup

# The fast lane: no pipeline loaded, no fuzzing, no processes (under 2 minutes).
test-unit: venv
	$(BIN)/pytest -q -m "not model and not fuzz and not integration"

# The tests that need a CUDA device (marked `gpu`; `make test` runs them too). Without one they are
# listed as skipped; no test marked at all (pytest's exit status 5) fails with a message.
test-gpu: venv
	$(BIN)/pytest -q -m gpu -rs || { status=$$?; [ $$status -ne 5 ] || echo "make test-gpu: no test is marked gpu" >&2; exit $$status; }

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The configuration reference in docs/configuration.md, from the config model's field descriptions
# (tests/docs/test_config_reference.py fails while the page is stale).
docs: venv
	$(BIN)/python docs/make_config_reference.py

bench: venv
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/lora_fusion.py
	$(BIN)/python benchmarks/gpu_throughput.py
	$(BIN)/python benchmarks/load_time.py

clean:
	rm -rf $(VENV) outputs .cache .pytest_cache .mypy_cache .ruff_cache
