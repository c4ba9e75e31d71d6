# make demo   the offline demo: the whole DVC pipeline on a small sample and a small GPT-2 (< 10 min, 2 CPU cores)
# make test   the test suite
# make bench  benchmarks (LoRA step vs PEFT and full fine-tuning; scorer speed; allocator setting; GPU protocol)
# Each creates .venv/ first when it is missing or older than the pinned requirements.

VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.PHONY: demo test bench venv clean

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and alone: `torch==2.13.0` resolves to the CPU build where one is on disk, CUDA elsewhere
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	bash scripts/demo.sh

# pytest-xdist: a test module per worker process (its module fixtures built once), one thread each (conftest);
# TEST_WORKERS=0 runs the suite in this one process. Random order (pytest-randomly) either way.
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: venv
	$(BIN)/python benchmarks/bench_lora.py
	$(BIN)/python benchmarks/bench_score.py
	$(BIN)/python benchmarks/bench_allocator.py
	$(BIN)/python benchmarks/bench_gpu.py --out benchmarks/bench_gpu.json

clean:
	rm -rf demo .pytest_cache
