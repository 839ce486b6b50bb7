# Two commands do the work: `make book` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch's OpenMP threads spin-wait by default, which makes small ops 10x slower on a busy 2-core machine
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: book test bench seeds venv clean lab

# uv installs the same packages as pip about 3x faster (45 s against 140 s cold, mostly torch's CUDA wheels);
# constraints.txt pins the torch build the seeds table was computed with
$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q "uv>=0.5,<1"
	$(VENV)/bin/uv pip install -q --no-cache --python $(VPY) --constraint constraints.txt -e ".[book,test,bench]"
	$(VPY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/usae book

# pytest-xdist: one worker per core (at most 4), each test file (and each chapter's cells) on one worker; on 2
# cores the suite runs in 7 min instead of 16 (many tests wait on subprocesses and kernels)
test: $(STAMP)
	$(VENV)/bin/ruff check usae tests
	$(VPY) -m pytest -n auto --maxprocesses 4 --dist loadfile

# every chapter's claims for seeds 0-4 at the book preset -> data/seeds/book.json (about an hour on 2 cores)
seeds: $(STAMP)
	$(VENV)/bin/usae seeds --preset book --seeds 0-4 --jobs 2

bench: $(STAMP)
	$(VENV)/bin/usae bench

lab: $(STAMP)
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build book/_build
