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

.PHONY: setup browser demo lint test test-slow
setup: $(VENV)/.installed

# The index service's web page (/ui) is tested in Debian's Chromium, driven by Playwright (dev extra) with
# executable_path: Playwright's own browser download is not used. Installed here when missing and apt-get
# can run (as root); otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "chromium is missing and apt-get cannot install it here: the browser tests of /ui will skip"

demo: setup
	WANDB_MODE=offline $(VENV)/bin/compatembed-demo

lint: setup
	$(VENV)/bin/ruff check .

test: setup lint browser
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -rs $(PYTEST_ARGS)

test-slow: setup
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS)
