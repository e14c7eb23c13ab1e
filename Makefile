# Quick start: `make demo` and `make test`. Both bootstrap .venv on first use and reuse it.
# .venv gets the full set (the learning server, the bundled digits, images, plots, tests); a
# sensor or device needs only `pip install edgecl` (README: "Lean install").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := server,data,images,plot,federation,test

.PHONY: demo test bench federate venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# torch and torchvision come from the registry together: a lone CPU torch wheel
	# cannot load the registry's torchvision operators.
	$(PY) -m pip install -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m edgecl demo

test: $(STAMP)
	$(PY) -m pytest

federate: $(STAMP)
	$(PY) -m edgecl federate local

bench: $(STAMP)
	$(PY) -m edgecl bench split-mnist --buffer 200 --seeds 0,1,2

clean:
	rm -rf $(VENV) build *.egg-info
