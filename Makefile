# Two commands do everything: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Everything loads from local folders; never reach for a hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install demo demo-edit-v1 demo-edit-v2 demo-edit-v3 test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the tiny offline default: write model + data, build caches, train, print the LoRA.
# Each run starts fresh (the model and data are regenerated, so old caches and outputs would not match).
demo: install
	rm -rf .demo/cache .demo/output .demo/data
	$(BIN)/python -m demo
	$(MAKE) --no-print-directory demo-edit-v1 demo-edit-v2 demo-edit-v3
	@echo "LoRAs (diffusers + ComfyUI; edit-v1 also its EMA in ema/), logs, loss.png and preview grids (previews/): .demo/output/edit-v1 .demo/output/edit-v2 .demo/output/edit-v3"
	@echo "before and after training, per held-out sample: .demo/output/edit-v1/previews/before-after.png .demo/output/edit-v2/previews/before-after.png .demo/output/edit-v3/previews/before-after.png"

demo-edit-v1 demo-edit-v2 demo-edit-v3: demo-%: install
	$(BIN)/prep build-cache --config configs/demo-$*/config.json
	$(BIN)/train run --config configs/demo-$*/config.json

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .demo .pytest_cache
