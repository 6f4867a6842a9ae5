# ssl_lib: make help lists the targets.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help

PYTHON ?= python

.PHONY: help install test bench accuracy tune tune-protocol kernel clean reports clear-outputs FORCE

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

install: ## install the package with its dev/notebook extras into the current environment
	$(PYTHON) -m pip install -e ".[dev]"

# The tests and the notebooks (nbval, on their defaults) in one pytest run spread over the CPU's cores
# (pytest-xdist, TEST_WORKERS=auto: one worker per core, one thread each, so that no two fight over a
# core); --dist loadfile keeps each file's tests, and each notebook's cells, on one worker, in order.
TEST_WORKERS ?= auto
test: ## run the test suite and every notebook on its defaults (nbval): CPU only, < 5 minutes on 2 cores
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile -p no:cacheprovider \
		tests notebooks --nbval-lax --nbval-current-env

# make bench [CONFIG=file] [DATASET=...] [DATA_ROOT=dir] [CACHE_DIR=dir] [BENCH_ARGS="--set device=cuda --repeats 3"]
BENCH_ARGS ?=
bench: ## speed and memory benchmark, < 5 min on 2 cores (writes bench/bench.json, prints a table)
	$(PYTHON) -m ssl_lib bench $(if $(CONFIG),--config $(CONFIG)) $(if $(DATASET),--set dataset=$(DATASET)) \
		$(if $(DATA_ROOT),--set data_root=$(DATA_ROOT)) $(if $(CACHE_DIR),--set cache_dir=$(CACHE_DIR)) $(BENCH_ARGS)

# make accuracy [DATASET=...] [DATA_ROOT=dir] [SEEDS="0 1 2"] [ACCURACY_ARGS="--compare bench/accuracy-before.json"]
SEEDS ?= 0 1 2
ACCURACY_ARGS ?=
accuracy: ## train configs/checks/accuracy.yaml once per seed: did a change move accuracy? (bench/accuracy.json)
	$(PYTHON) -m ssl_lib accuracy --config configs/checks/accuracy.yaml --seeds $(SEEDS) \
		$(if $(DATASET),--set dataset=$(DATASET)) $(if $(DATA_ROOT),--set data_root=$(DATA_ROOT)) \
		$(if $(CACHE_DIR),--set cache_dir=$(CACHE_DIR)) $(ACCURACY_ARGS)

# make gpu-check [DATASET=cifar10|imagefolder] [DATA_ROOT=dir] [CACHE_DIR=dir] [GPU_CHECK_ARGS="--epochs 3 --quick"]
# Runs from the source tree (PYTHONPATH), so a GPU machine needs no pip install: make gpu-check PYTHON=python3
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: ## NVIDIA GPU: CUDA checks, bench bf16+compile and fp32, a short exp1-m40000 training (bench/gpu-check.json)
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m ssl_lib gpu-check \
		$(if $(DATASET),--dataset $(DATASET)) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
		$(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(GPU_CHECK_ARGS)

# make gpu-session DATASET=cifar10|imagefolder DATA_ROOT=dir [CACHE_DIR=dir] [GPU_OUT=bench/gpu-session] [PYTHON=python3]
# What one GPU session measures, in one command, from the source tree (docs/protocol.md, "A first GPU
# session"): gpu-check --quick (its failures reported, the rest still run), the protocol's 250-label
# pair for 2,048 steps (configs/protocol/profiles/gpu-probe.yaml; each run's epochs printed: seconds,
# images/s, test acc, mask rate, k-means share, spread) and the history's write cost (bench-history).
GPU_OUT ?= bench/gpu-session
.PHONY: gpu-session
gpu-session: ## NVIDIA GPU: gpu-check --quick, the protocol's 250-label pair for 2,048 steps, bench-history (GPU_OUT)
	@test -n "$(DATA_ROOT)" || { echo "make gpu-session: give DATA_ROOT=dir (and DATASET): the protocol pair trains on real images"; exit 2; }
	mkdir -p $(GPU_OUT)
	-PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m ssl_lib gpu-check --quick \
		$(if $(DATASET),--dataset $(DATASET)) --data-root $(DATA_ROOT) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) \
		--out $(GPU_OUT)/gpu-check.json
	set -o pipefail; PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m ssl_lib experiments protocol gpu-probe \
		--runs $(GPU_OUT)/runs $(if $(DATASET),--dataset $(DATASET)) --data-root $(DATA_ROOT) \
		$(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) --epochs 2>&1 | tee $(GPU_OUT)/gpu-probe.txt
	set -o pipefail; PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m ssl_lib bench-history \
		--out $(GPU_OUT)/history.json | tee $(GPU_OUT)/history.txt

# ------------------------------------------------------------------------------------ tuning
# make tune [PROFILE=full|quick|smoke] [TRIALS=n] [STORAGE=postgresql://...] [WORKERS=k] [DATASET=...]
#           [DATA_ROOT=dir] [CACHE_DIR=dir] [TUNE_ARGS="--set device=cuda"]   (the data as for make reports)
#   Both studies of configs/tuning/ on the same budget: the method's knobs with the k-means term
#   (kmeans.yaml) and without it (no-kmeans.yaml), on configs/tuning/base.yaml scaled by PROFILE, into
#   runs/tuning/exp2-<study>-<profile>/ (best.yaml, study.json, trials/, final-*/). Rerun to continue
#   an interrupted study; with STORAGE, the same command on other machines joins the same studies.
# TRIALS empty: the profile's tune_trials (configs/profiles/<profile>.yaml: smoke 3, quick 20, full 40)
TRIALS ?=
WORKERS ?= 1
TUNE_ARGS ?=
TUNE_STUDIES := kmeans no-kmeans
tune: ## tune both studies of configs/tuning/ (with and without k-means) under PROFILE [TRIALS=n STORAGE=url WORKERS=k]
	for study in $(TUNE_STUDIES); do \
		$(PYTHON) -m ssl_lib tune --config configs/tuning/base.yaml --space configs/tuning/$$study.yaml \
			--profile $(PROFILE) $(if $(TRIALS),--trials $(TRIALS)) --workers $(WORKERS) $(if $(STORAGE),--storage $(STORAGE)) \
			$(TUNE_ARGS); \
	done

# make tune-protocol [PROTOCOL_STUDY=study|study-cpu] [STORAGE=postgresql://...] [WORKERS=k] [TUNE_ARGS=...]
#   The protocol study (configs/protocol/tuning/w_kmeans.yaml): which k-means weight at 250 labels, each
#   trial 2^14 steps scored on 5,000 held-out training images (about an hour on one GPU: add
#   TUNE_ARGS="--set device=cuda --set precision=bf16 --set compile=true"); study-cpu is the same on
#   synthetic images in minutes. Into runs/tuning/fixmatch-kmeans-250-w_kmeans-<profile>/ (no final
#   training: the full protocol profile's paired seeds are the test of the weight it picks).
PROTOCOL_STUDY ?= study
tune-protocol: ## the protocol's k-means weight study [PROTOCOL_STUDY=study|study-cpu TRIALS=n STORAGE=url WORKERS=k]
	$(PYTHON) -m ssl_lib tune --config configs/protocol/fixmatch-kmeans-250.yaml --space configs/protocol/tuning/w_kmeans.yaml \
		--protocol-profile $(PROTOCOL_STUDY) --no-final $(if $(TRIALS),--trials $(TRIALS)) --workers $(WORKERS) \
		$(if $(STORAGE),--storage $(STORAGE)) $(TUNE_ARGS)

# make dashboard STUDY=runs/tuning/<study> [STORAGE=postgresql://...] [PORT=8080]
#   optuna-dashboard on the study's storage: STUDY/study.journal, or STORAGE for a study in a database.
#   The trials' curves: tensorboard --logdir STUDY (docs/live-curves.md)
.PHONY: dashboard
dashboard: ## optuna-dashboard on a tuning study (STUDY=runs/tuning/<study> [STORAGE=url PORT=8080])
	$(PYTHON) -m ssl_lib report dashboard "$(STUDY)" $(if $(STORAGE),--storage "$(STORAGE)") $(if $(PORT),--port $(PORT))

kernel: ## register this environment as the Jupyter kernel "ssl-lib"
	$(PYTHON) -m ipykernel install --user --name ssl-lib --display-name "Python (ssl-lib)"

clean: ## remove generated reports, runs and benchmarks (not the data cache)
	rm -rf reports/*/ runs/ bench/

# ------------------------------------------------------------------------------------ reports
# make reports [PROFILE=full|quick|smoke] [DATASET=cifar10|imagefolder] [DATA_ROOT=dir] [CACHE_DIR=dir] [RUNS=dir]
#              [SLOTS=n] [THREADS=n] [EXECUTOR=local|ray|slurm] [RAY_ADDRESS=host:port]
#              [SLURM_PARTITION=p SLURM_ACCOUNT=a SLURM_TIME_MIN=m SLURM_GPUS_PER_RUN=g SLURM_MEM_GB=n SLURM_CONFIG=file]
#   1. $(BUILD)/data.json      the profile's data, decoded and cached once (rewritten only if it changes)
#   2. $(BUILD)/<exp>.run.json every experiment whose runs/<profile>/<name>-<config hash>/ is not finished,
#                              trained together by one command (always checked; each pointer rewritten
#                              only when its run changes); the tuned and protocol runs likewise
#   3. <page>.html             each notebook executed with papermill, rendered with nbconvert
#   4. index.html              links every page; the eight runs beside the writeup's figures
# Outputs are written under temporary names and renamed; a failing cell stops the build naming the
# notebook and the cell. Many runs at once (docs/scale-out.md): SLOTS=n trains n runs at a time on
# this machine, each on its own GPU, or on a CPU with THREADS threads (default: the cores / n);
# EXECUTOR=ray makes each run a Ray task, on the cluster at RAY_ADDRESS or on a local instance;
# EXECUTOR=slurm makes each run a SLURM job (submitit), with the SLURM_* settings above.
# Stages that share a runs root take turns (a lock), so make -j gives the same runs. The numbers do
# not depend on SLOTS or EXECUTOR at the same THREADS.
PROFILE ?= full
# A misspelt profile, or a SLOTS, THREADS or EXECUTOR that cannot be, stops here with one line.
ifneq ($(filter reports,$(MAKECMDGOALS)),)
ifeq ($(wildcard configs/profiles/$(PROFILE).yaml),)
$(error PROFILE=$(PROFILE): no configs/profiles/$(PROFILE).yaml; profiles: $(basename $(notdir $(wildcard configs/profiles/*.yaml))))
endif
digits_out = $(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(1)))))))))))
is_count = $(if $(and $(filter 1,$(words $(1))),$(filter-out 0%,$(1))),$(if $(call digits_out,$(1)),,yes))
ifneq ($(SLOTS),)
ifneq ($(call is_count,$(SLOTS)),yes)
$(error SLOTS=$(SLOTS): must be a positive integer (runs at a time))
endif
endif
ifneq ($(THREADS),)
ifneq ($(call is_count,$(THREADS)),yes)
$(error THREADS=$(THREADS): must be a positive integer (CPU threads per run))
endif
endif
ifneq ($(filter-out local ray slurm,$(EXECUTOR)),)
$(error EXECUTOR=$(EXECUTOR): must be local, ray or slurm)
endif
endif
ifdef DATASET
export SSL_LIB_DATASET := $(DATASET)
endif
ifdef DATA_ROOT
export SSL_LIB_DATA_ROOT := $(DATA_ROOT)
endif
ifdef CACHE_DIR
export SSL_LIB_CACHE_DIR := $(CACHE_DIR)
endif
ifdef RUNS
export SSL_LIB_RUNS := $(RUNS)
endif
ifdef SLOTS
export SSL_LIB_SLOTS := $(SLOTS)
endif
ifdef THREADS
export SSL_LIB_THREADS := $(THREADS)
endif
ifdef EXECUTOR
export SSL_LIB_EXECUTOR := $(EXECUTOR)
endif
# On a machine without an NVIDIA GPU, the local executor trains one run per core at one thread each
# unless SLOTS or THREADS is given: the writeup CNN's small convolutions gain 1.23x from a second
# thread, two one-thread runs side by side 2x (docs/performance.md). The numbers are THREADS=1's.
ifneq ($(filter reports,$(MAKECMDGOALS)),)
ifeq ($(SLOTS)$(THREADS)$(SSL_LIB_SLOTS)$(SSL_LIB_THREADS)$(filter-out local,$(EXECUTOR) $(SSL_LIB_EXECUTOR)),)
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'),0)
export SSL_LIB_SLOTS := $(shell nproc 2>/dev/null || echo 1)
export SSL_LIB_THREADS := 1
endif
endif
endif
# EXECUTOR=slurm's job settings (ssl_lib/experiments/slurm.py checks them)
$(foreach v,PARTITION ACCOUNT TIME_MIN GPUS_PER_RUN MEM_GB CONFIG,$(if $(SLURM_$(v)),$(eval export SSL_LIB_SLURM_$(v) := $(SLURM_$(v)))))

REPORT := reports/$(PROFILE)
BUILD := $(REPORT)/.build
EXPERIMENTS := $(sort $(basename $(notdir $(wildcard configs/exp*.yaml))))
RUN_POINTERS := $(EXPERIMENTS:%=$(BUILD)/%.run.json)
WRITEUP_EXPERIMENTS := $(filter exp1-% exp2-%,$(EXPERIMENTS))
PAGES := 01-data 02-augmentation $(WRITEUP_EXPERIMENTS:%=03-training-%) 04-ablations 05-conclusions
PAGES += 06-tuning  # tuning: two random-search pools of configs/tuning/ and the untuned pair (rules below)
PAGES += 07-protocol
REPORT_DEPS := $(shell find ssl_lib -name "*.py") configs/profiles/$(PROFILE).yaml
PAGE_CMD = $(PYTHON) -m ssl_lib report page $(1) --profile $(PROFILE) --out $(REPORT)

reports: $(REPORT)/index.html ## train what is missing, execute the notebooks, render reports/PROFILE/ (PROFILE=full|quick|smoke) [SLOTS=n EXECUTOR=ray THREADS=n]

# OpenMP threads that sleep instead of spinning while they wait: same numbers, and on a CPU shared
# with other jobs (or with the notebook kernels of make -j) training runs several times faster.
reports: export OMP_WAIT_POLICY ?= PASSIVE

# The stages and pages that do not depend on each other run side by side, one job per core (JOBS=1:
# one at a time): a page's kernel is mostly one thread and seconds of start-up. The numbers do not
# change: a run's threads are set by THREADS/SLOTS, not by how many jobs make runs.
JOBS ?= $(shell nproc 2>/dev/null || echo 1)
ifneq ($(filter reports,$(MAKECMDGOALS)),)
MAKEFLAGS += -j$(JOBS) --output-sync=target
endif

$(BUILD)/data.json: configs/profiles/$(PROFILE).yaml FORCE
	$(PYTHON) -m ssl_lib experiments data $(PROFILE) --out $@

# one command for the whole grid (one start-up, then SLOTS runs at a time): a grouped target
$(RUN_POINTERS) &: $(EXPERIMENTS:%=configs/%.yaml) $(BUILD)/data.json FORCE
	$(PYTHON) -m ssl_lib experiments train $(PROFILE) $(EXPERIMENTS) --pointer-dir $(BUILD)

$(REPORT)/01-data.html $(REPORT)/02-augmentation.html: $(REPORT)/%.html: notebooks/%.ipynb $(BUILD)/data.json $(REPORT_DEPS)
	$(call PAGE_CMD,$*)

$(REPORT)/03-training-%.html: notebooks/03-training.ipynb $(BUILD)/%.run.json $(REPORT_DEPS)
	$(call PAGE_CMD,03-training-$*)

$(REPORT)/04-ablations.html $(REPORT)/05-conclusions.html: $(REPORT)/%.html: notebooks/%.ipynb $(RUN_POINTERS) $(REPORT_DEPS)
	$(call PAGE_CMD,$*)

# tuning: one random-search pool per space of configs/tuning/ (TRIALS trials each, trial i on seed i on both
# sides, every trial scored once on the test set after the pool), then the untuned exp2-wk0.25 with and
# without the k-means term over a few seeds (docs/tuning.md, "In the report")
$(BUILD)/tuning.json: configs/tuning/base.yaml configs/tuning/kmeans.yaml configs/tuning/no-kmeans.yaml $(BUILD)/data.json FORCE
	$(PYTHON) -m ssl_lib.tuning.report train $(PROFILE) $(if $(TRIALS),--trials $(TRIALS)) --pointer $@

$(REPORT)/06-tuning.html: notebooks/06-tuning.ipynb $(BUILD)/tuning.json $(REPORT_DEPS)
	$(call PAGE_CMD,06-tuning)

# the FixMatch protocol's runs of the protocol profile of the same name (configs/protocol/profiles/)
$(BUILD)/protocol.json: $(wildcard configs/protocol/*.yaml) configs/protocol/profiles/$(PROFILE).yaml $(BUILD)/data.json FORCE
	$(PYTHON) -m ssl_lib experiments protocol $(PROFILE) --pointer $@

$(REPORT)/07-protocol.html: notebooks/07-protocol.ipynb $(BUILD)/protocol.json $(REPORT_DEPS)
	$(call PAGE_CMD,07-protocol)

$(REPORT)/index.html: $(PAGES:%=$(REPORT)/%.html) $(RUN_POINTERS)
	$(PYTHON) -m ssl_lib report index --profile $(PROFILE) --out $(REPORT)
	@echo "report: $(REPORT)/index.html"

clear-outputs: ## clear outputs and execution counts of notebooks/*.ipynb (committed without them)
	$(PYTHON) -m nbconvert --clear-output --inplace notebooks/*.ipynb

FORCE:
