# Every target installs what it needs on first use (see scripts/setup.sh).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

demo: $(STAMP)
	$(VENV)/bin/improver demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/improver bench rollout --out bench/rollout.json

clean:
	rm -rf $(VENV) demo_out
