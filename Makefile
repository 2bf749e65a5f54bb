# Two commands do everything on a fresh machine (Python 3.10+):
#   make demo   set up .venv and run the end-to-end demo on the shared CIFAR-10
#   make test   set up .venv, lint (ruff check .) and run the tests (what CI runs)
PYTHON ?= python3
VENV ?= .venv
# The torch pair installed first; override for another platform, e.g. make TORCH="torch torchvision" test
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet $(TORCH)
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: setup demo lint test test-slow
setup: $(VENV)/.installed

demo: setup
	WANDB_MODE=offline $(VENV)/bin/compatembed-demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

test-slow: setup
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)
