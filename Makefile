# Every target installs what it needs into .venv first (torch/torchvision come from the local disk).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# The CPU-sized default (docs/design.md section 9): 1000 classes at 128 px, 50k points, from base seed SEED.
SEED       ?= 4
CPU_SHARDS ?= shards/cpu-seed$(SEED)
RUN        ?= runs/cpu-seed$(SEED)
# bf16 autocast or fp32 for pre-training, fine-tuning and the experiments; auto: bf16 on CUDA and on CPUs with bf16
# units (AVX512-BF16, AMX), fp32 elsewhere (docs/training.md, "Precision").
PRECISION  ?= auto

.PHONY: install test test-slow mutants lint bench pretrain finetune publish compare sweep-delta sweep-sigma sweep-bases \
	control sweep-resolution score-bases which-base which-base-held-out clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# a worker per core (at most 8), each test given to whichever worker is free: 2 min 27 s on 2 cores against 3 min 48 s
# to 4 min 33 s one after another (docs/speed.md); the slow suite stays in one process (it times real kills)
test: install
	$(BIN)/python -m pytest -m "not slow" -q -n auto --maxprocesses 8 --dist worksteal

test-slow: install
	$(BIN)/python -m pytest -m slow -q

# One module's mutation pass (docs/testing.md): make mutants MODULE=train/checkpoint.py [SURVIVORS=1: only the
# mutants the last pass left alive, after a new test]
mutants: install
	$(BIN)/pip install -q mutmut==3.8.1
	$(BIN)/python tests/mutants.py "$(MODULE)" $(if $(SURVIVORS),--survivors)

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench.py

# Renders the shards if they are missing (or finishes an interrupted render), then pre-trains;
# a second `make pretrain` resumes the run from its last checkpoint instead of starting over.
pretrain: install
	$(BIN)/fracgen render --classes 1000 --size 128 --points 50000 --seed $(SEED) --out $(CPU_SHARDS) --resume
	$(BIN)/fracgen-train pretrain --shards $(CPU_SHARDS) --out $(RUN) --precision $(PRECISION)

# Fine-tunes the pre-trained checkpoint and, as the baseline, the same network from scratch (digits, 3 seeds).
finetune: install
	$(BIN)/fracgen-train finetune --checkpoint $(RUN) --out $(RUN)/digits --precision $(PRECISION)
	$(BIN)/fracgen-train finetune --checkpoint none --out runs/scratch-digits --precision $(PRECISION)

# Model card (with both fine-tuning results) and SHA256SUMS in the run folder; `--to hf://ORG/NAME` to upload.
publish: install
	$(BIN)/fracgen-train publish $(RUN) $(if $(wildcard runs/scratch-digits/results.json),--results runs/scratch-digits/results.json)

# The paper's comparisons at CPU scale (train/experiments.py; docs/results.md): each writes docs/results/NAME.csv,
# .md and .png and prints its time. Runs are kept under runs/experiments and reused by the other targets.
# `make control`: base A of docs/design.md section 9, the positive control (a protocol that shows no gain there shows none).
# `make sweep-resolution`: 32-224 px on one GPU, 12 runs side by side inside an 8-minute time box (on a CPU nothing
# fits the box, and it says so); docs/results/gpu/sweep_resolution.sh is the same as one device call.
# `make score-bases`: 16 bases drawn by seed and base A at the GPU compare budget (5000 steps, 9 runs side by side in
# an 8-minute box), then fracgen score's measures of their data against their pretext top-1 (Spearman).
# `make which-base`: make pretrain's recipe on the bases drawn by seed 0-11 and scratch, then measures of each base's
# data against pretext and fine-tuned top-1 (about 2 hours on 2 cores at bf16); `make which-base-held-out`: seeds 12-15.
compare sweep-delta sweep-sigma sweep-bases control sweep-resolution score-bases which-base which-base-held-out: install
	$(BIN)/fracgen-train experiments $@ --precision $(PRECISION)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
