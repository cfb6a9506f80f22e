# One-machine entry points. `make run` and `make test` are all a new user needs.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
export OMP_NUM_THREADS ?= $(shell nproc)
export TOKENIZERS_PARALLELISM := false

.PHONY: setup lint test test-slow gpu-check run eval-smol smol bench-speedup bench-verify bench-buffer bench-faults bench-rollout bench-learner curve study dashboard ray-up ray-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing into $(VENV) (a few minutes, once; pip's output goes to $(VENV)/install.log)"
	@( $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q -c constraints.txt -e '.[dev]' ) \
		> $(VENV)/install.log 2>&1 || { tail -30 $(VENV)/install.log; echo "setup failed: $(VENV)/install.log"; exit 1; }
	touch $(STAMP)

test: setup lint
	$(BIN)/pytest -q

lint: setup  # ruff: lint and format check (line length 120, pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

gpu-check: setup  # on a machine with CUDA: the GPU tests, one summary line per test, 10 minutes at most
	timeout 600 $(BIN)/pytest -m gpu -rA -q tests/test_gpu.py

test-slow: setup
	$(BIN)/pytest -q -m slow

smol: setup
	$(BIN)/draft-opd smol

# make run: the target's greedy answers to 128 GSM8K training prompts (a corpus, made once), 400 offline SFT steps
# on it, then 40 Draft-OPD steps on the rollouts of two actors
RUN_CORPUS := runs/smol-corpus
run: smol
	$(BIN)/draft-opd generate configs/smol.yaml generate.out=$(RUN_CORPUS) generate.num_prompts=128 \
		generate.batch_size=64 generate.store_features=true
	$(BIN)/draft-opd train configs/smol.yaml train.sft_corpus=$(RUN_CORPUS) resume=auto

# the shipped draft (make curve); DRAFT=runs/smol/draft for the make run one
DRAFT ?= models/smol-dflash
EVAL_PROMPTS ?= 50
eval-smol: smol  # tau, speedup and losslessness: GSM8K test and HumanEval, EVAL_PROMPTS x 128 new tokens, fp32
	$(BIN)/draft-opd eval configs/smol.yaml eval.benchmarks=[gsm8k,humaneval] eval.num_prompts=$(EVAL_PROMPTS) \
		eval.max_new_tokens=128 draft=$(DRAFT) eval.out=runs/eval-smol.json

METRICS_PORT ?= 8080
TENSORBOARD_PORT ?= 6006
RAY_NUM_CPUS ?= 4  # logical CPUs: make run places 2 rollout actors and 1 learner, more than 2 cores

ray-up: setup
	PATH=$(CURDIR)/$(BIN):$$PATH RAY_AUTH_MODE=token $(BIN)/ray start --head --dashboard-host=127.0.0.1 \
		--num-cpus=$(RAY_NUM_CPUS) --metrics-export-port=$(METRICS_PORT)
	@echo "submit with: RAY_AUTH_MODE=token RAY_ADDRESS=http://127.0.0.1:8265 $(BIN)/ray job submit --working-dir . -- python -m draft_opd.launch.train configs/smol.yaml"

dashboard: ray-up
	mkdir -p runs
	nohup $(BIN)/tensorboard --logdir runs --host 127.0.0.1 --port $(TENSORBOARD_PORT) > runs/tensorboard.log 2>&1 & \
		echo $$! > runs/.tensorboard.pid
	@echo "Ray dashboard        http://127.0.0.1:8265"
	@echo "Prometheus endpoint  http://127.0.0.1:$(METRICS_PORT)/metrics  (gauges ray_draft_opd_*)"
	@echo "TensorBoard          http://127.0.0.1:$(TENSORBOARD_PORT)  (runs/*/tensorboard)"
	@echo "train on this cluster: RAY_AUTH_MODE=token RAY_ADDRESS=auto make run; stop all: make ray-down"

ray-down:
	$(BIN)/ray stop
	if [ -f runs/.tensorboard.pid ]; then kill $$(cat runs/.tensorboard.pid) 2>/dev/null; rm -f runs/.tensorboard.pid; fi

bench-speedup: smol  # the phases of a speculative step vs a plain step, with the draft DRAFT
	$(BIN)/python -m draft_opd.perf.speedup configs/smol.yaml draft=$(DRAFT)

bench-verify: smol
	$(BIN)/python -m draft_opd.perf.verify configs/smol.yaml

bench-rollout: smol  # sequential B=1, 4, 16 against parallel rollouts, with the draft DRAFT
	$(BIN)/python -m draft_opd.perf.rollout configs/smol.yaml draft=$(DRAFT)

bench-learner: smol
	$(BIN)/python -m draft_opd.perf.learner configs/smol.yaml

curve: smol  # about 2 hours; shorter: CURVE_ARGS="generate.num_prompts=1024 train.sft_steps=800"; EAGLE-3: CURVE_ARGS="draft.kind=eagle3 draft.num_layers=1 draft.draft_vocab_size=8192"
	$(BIN)/python -m draft_opd.studies.sft_curve configs/smol.yaml $(CURVE_ARGS)

study: smol  # the whole grid by default; e.g. make study STUDY_ARGS="--starts plateau --arms sft,opd --seeds 0"
	$(BIN)/python -m draft_opd.studies.opd configs/smol.yaml $(STUDY_ARGS)

bench-buffer: setup
	$(BIN)/python -m draft_opd.perf.buffer

bench-faults: setup
	$(BIN)/python -m draft_opd.faults.table

clean:
	rm -rf $(VENV) runs .pytest_cache
