# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean model model-segment model-classify

$(STAMP): pyproject.toml requirements.lock
	@echo "==> creating $(VENV) and installing pinned dependencies (first run: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	@# datumaro (CVAT's dataset library) checks export-coco; every release pins opencv/pillow/pyarrow/numpy
	@# versions other than ours, so it goes in without its dependencies, those it needs pinned in the lock.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -c requirements.lock datumaro cachetools imagesize json-stream json-stream-rs-tokenizer orjson ruamel.yaml shapely
	@touch $(STAMP)

# The demo's model: the small Mask R-CNN that `make model` trains (jobs/train_shapes.yaml), shipped
# in the repo (conf/models/README.md). Delete the file and the demo trains it first (about 11.5 min).
MODEL := conf/models/small_maskrcnn_shapes.pth

demo: $(STAMP) $(MODEL)
	@echo "==> 1/4 held-out synthetic shapes (200 images, seed 300: never seen in training) -> demo-output/shapes-test"
	@rm -rf demo-output/shapes-test
	$(BIN)/pipeline data synth demo-output/shapes-test --images 200 --seed 300
	@echo "==> 2/4 boxes + masks from the trained small Mask R-CNN ($(MODEL)) on embedded Ray, then COCO eval"
	$(BIN)/pipeline run jobs/shapes_masks.yaml --overwrite
	@echo "==> 3/4 pictures of the predictions -> demo-output/pictures"
	$(BIN)/pipeline data render demo-output/shapes-masks demo-output/pictures --limit 6 --min-score 0.5
	@echo "==> 4/4 the COCO summary (same numbers as demo-output/shapes-masks/metrics.json)"
	$(BIN)/pipeline eval demo-output/shapes-masks --gt demo-output/shapes-test --iou-type bbox --iou-type segm

# Train the demo's model from scratch with Ray Train (2 workers, 10-minute budget) and install it.
model $(MODEL): | $(STAMP)
	@echo "==> training data: 3000 synthetic images (seed 100), 200 for validation (seed 200)"
	@rm -rf demo-output/shapes-train demo-output/shapes-val demo-output/train_shapes
	$(BIN)/pipeline data synth demo-output/shapes-train --images 3000 --seed 100
	$(BIN)/pipeline data synth demo-output/shapes-val --images 200 --seed 200
	$(BIN)/pipeline train jobs/train_shapes.yaml
	@mkdir -p $(dir $(MODEL))
	cp demo-output/train_shapes/model.pth $(MODEL)

# Train the semantic segmentation model (small U-Net, jobs/train_segment_shapes.yaml, ~10 min) and install it.
SEGMENT_MODEL := conf/models/small_unet_shapes.pth

model-segment: | $(STAMP)
	@echo "==> training data: 3000 synthetic images (seed 100), 200 for validation (seed 200)"
	@rm -rf demo-output/shapes-train demo-output/shapes-val demo-output/train_segment_shapes
	$(BIN)/pipeline data synth demo-output/shapes-train --images 3000 --seed 100
	$(BIN)/pipeline data synth demo-output/shapes-val --images 200 --seed 200
	$(BIN)/pipeline train jobs/train_segment_shapes.yaml
	cp demo-output/train_segment_shapes/model.pth $(SEGMENT_MODEL)

# Train the classifier (small CNN, jobs/train_classify_shapes.yaml, ~5 min) and install it.
model-classify: | $(STAMP)
	@echo "==> training data: 3000 one-shape synthetic images (seed 100), 200 for validation (seed 200)"
	@rm -rf demo-output/shapes-cls-train demo-output/shapes-cls-val demo-output/train_classify_shapes
	$(BIN)/pipeline data synth demo-output/shapes-cls-train --images 3000 --seed 100 --classification
	$(BIN)/pipeline data synth demo-output/shapes-cls-val --images 200 --seed 200 --classification
	$(BIN)/pipeline train jobs/train_classify_shapes.yaml
	cp demo-output/train_classify_shapes/model.pth conf/models/small_cnn_shapes.pth

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

# The benchmarks behind bench/README.md (each prints its table; about 30 minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test,bench]'
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/masks.py
	$(BIN)/python bench/segment.py
	$(BIN)/python bench/eval_speed.py

clean:
	rm -rf demo-output bench-output .pytest_cache
