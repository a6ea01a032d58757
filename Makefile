# The few commands a user types. Every target builds .venv from the lock file first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Demo settings are overrides, never edits of params.yaml: random init (ImageNet
# weights cannot be downloaded offline), 75 px images, few epochs. Random-init features are
# tiny (std ~0.01), so the head needs a larger step (head_lr 0.01) and more epochs; on cached
# features an epoch costs ~0.1 s. No flip: a mirrored digit is another symbol.
DEMO_SET := -S model.weights=null -S model.image_size=75 -S augment.flip=none \
	-S train.head_lr=0.01 -S train.head_epochs=15 -S train.early_stopping_patience=5 \
	-S train.finetune_epochs=1 -S evaluate.ood_dir=data/ood

.PHONY: demo test test-fast bench ui install clean-venv

install: $(STAMP)

# uv installs the lock several times faster than pip (docs/development.md); pip installs uv
# itself, at the version the lock pins, so the lock stays the one source of versions.
# --compile-bytecode: uv, unlike pip, writes no .pyc by default; where PYTHONDONTWRITEBYTECODE
# is set (as in many Docker images and CI machines) every stage would then compile TensorFlow's
# and MLflow's sources again on each start.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$$(grep '^uv==' requirements.lock)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Before an experiment DVC checks out every stage's outputs; in a clone without dvc.lock none
# has a hash yet, so it warns once per output that it will not create it (it is about to run
# the stage that makes it). The filter keeps the first screen the pipeline's own; pipefail
# keeps DVC's exit code.
demo: SHELL := /bin/bash
demo: .SHELLFLAGS := -o pipefail -c
demo: $(STAMP)
	$(BIN)/imgclf demo-data data/raw --ood data/ood
	@echo ">>> Offline demo: model.weights=null (random init). ImageNet weights cannot be downloaded"
	@echo ">>> without network, so accuracy is far below a real run's. The demo settings are DVC"
	@echo ">>> experiment overrides (-S); the committed params.yaml keeps the real defaults."
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run $(DEMO_SET) 2>&1 \
		| grep --line-buffered -v "^WARNING: No file hash info found for"
	@# The first demo model becomes @production (no holder yet, so the gate passes); on a
	@# rerun the new version must beat it like any other candidate.
	-$(BIN)/imgclf promote --latest
	@echo ">>> Next: make ui; source .venv/bin/activate; imgclf predict data/raw/3 --format kaggle -o submission.csv"

test: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest

# The edit loop: the unit tests that need no trained project and no pipeline run.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m "not slow and not project"

bench: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.render

ui: $(STAMP)
	$(BIN)/imgclf ui

clean-venv:
	rm -rf $(VENV)
