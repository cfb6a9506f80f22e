# One-machine entry points. `make run` and `make test` are all a new user needs.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
export OMP_NUM_THREADS ?= $(shell nproc)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow run eval-smol smol bench-verify bench-buffer ray-up ray-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/pytest -q

test-slow: setup
	$(BIN)/pytest -q -m slow

smol: setup
	$(BIN)/draft-opd smol

run: smol
	$(BIN)/draft-opd train configs/smol.yaml

eval-smol: smol
	$(BIN)/draft-opd eval configs/smol.yaml eval.benchmarks=[gsm8k,humaneval] eval.num_prompts=4 \
		draft=runs/smol/draft eval.out=runs/eval-smol.json

ray-up: setup
	PATH=$(CURDIR)/$(BIN):$$PATH RAY_AUTH_MODE=token $(BIN)/ray start --head --dashboard-host=127.0.0.1
	@echo "submit with: RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 $(BIN)/ray job submit --working-dir . -- python -m launch.train configs/smol.yaml"

ray-down:
	$(BIN)/ray stop

bench-verify: smol
	$(BIN)/python -m benchmarks.bench_verify configs/smol.yaml

bench-buffer: setup
	$(BIN)/python -m benchmarks.bench_buffer

clean:
	rm -rf $(VENV) runs .pytest_cache
