# make serve  — set up if needed, then serve configs/models.json on gRPC port 9000
# make test   — set up if needed, then run the test suite
# make fuzz   — coverage-guided fuzzing with atheris (FUZZ_TARGET=tensor|rest|kserve|config, FUZZ_RUNS); not in CI
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BUILD  := $(CURDIR)/build
CONFIG ?= configs/models.json
PORT   ?= 9000

.PHONY: setup serve test bench fuzz protos loaders lint clean image image-test

setup: $(STAMP) loaders configs/models/dummy/1/model.xml configs/models/dummy-encrypted/1/model.xml.enc

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "hotserve needs Python >= 3.11 ($(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

loaders:
	@$(MAKE) --no-print-directory -C loaders OUT=$(BUILD)

configs/models/dummy/1/model.xml configs/models/dummy-encrypted/1/model.xml.enc: | $(STAMP)
	$(BIN)/python configs/build_samples.py

serve: setup
	$(BIN)/hotserve serve --config_path $(CONFIG) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/infer.py
	$(BIN)/python benchmarks/batching.py
	$(BIN)/python benchmarks/streaming.py
	$(BIN)/python benchmarks/grpc_limit.py --profile benchmarks/results/grpc_limit_profile.txt
	$(BIN)/python benchmarks/traffic.py
	$(BIN)/python benchmarks/workers.py
	$(BIN)/python benchmarks/conv_hint.py
	$(BIN)/python benchmarks/load.py
	$(BIN)/python benchmarks/reload.py
	$(BIN)/python benchmarks/soak.py
	$(BIN)/python benchmarks/hostile.py
	$(BIN)/python benchmarks/fleet.py

FUZZ_TARGET ?= tensor
FUZZ_RUNS   ?= 200000
fuzz: setup
	$(BIN)/python -m pip install --quiet -e '.[fuzz]'
	$(BIN)/python tests/fuzz_atheris.py $(FUZZ_TARGET) -runs=$(FUZZ_RUNS)

# make image       — build the container image (podman or docker; see deploy/image.py). Not part of `make test`.
# make image-test  — run it against the default config and check both sample models answer
image: $(STAMP)
	$(BIN)/python deploy/image.py build

image-test: $(STAMP)
	$(BIN)/python deploy/image.py test

protos: $(STAMP)
	$(BIN)/python protos/generate.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(BUILD) $(VENV)
