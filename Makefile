# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements.lock
	@echo "==> creating $(VENV) and installing pinned dependencies (first run: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	@echo "==> 1/3 synthetic shapes dataset (64 images, exact boxes and masks) -> demo-output/shapes"
	@rm -rf demo-output/shapes
	$(BIN)/pipeline data synth demo-output/shapes --images 64 --seed 1
	@echo "==> 2/3 detection job on embedded Ray -> demo-output/detect"
	$(BIN)/pipeline run jobs/detect.yaml --input demo-output/shapes --output demo-output/detect --overwrite
	@echo "==> 3/3 what the job wrote"
	$(BIN)/pipeline data info demo-output/detect

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf demo-output bench-output .pytest_cache
