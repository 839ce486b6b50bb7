# Two commands do the work: `make book` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# torch's OpenMP threads spin-wait by default, which makes small ops 10x slower on a busy 2-core machine
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: book test bench seeds venv clean lab

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[book,test,bench]"
	$(VPY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

venv: $(STAMP)

book: $(STAMP)
	$(VENV)/bin/usae book

test: $(STAMP)
	$(VENV)/bin/ruff check usae tests
	$(VPY) -m pytest

# every chapter's claims for seeds 0-4 at the book preset -> data/seeds/book.json (about an hour on 2 cores)
seeds: $(STAMP)
	$(VENV)/bin/usae seeds --preset book --seeds 0-4 --jobs 2

bench: $(STAMP)
	$(VENV)/bin/usae bench

lab: $(STAMP)
	$(VENV)/bin/jupyter lab book/

clean:
	rm -rf _build book/_build
