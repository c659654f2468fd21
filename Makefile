# The two commands a user needs: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint format clean system-deps silero-vad

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

serve: $(STAMP) silero-vad
	$(BIN)/sl-serve $(ARGS)

# Debian tools the tests use: chromium for the browser-client test. Installed
# when missing and we may (root with apt); otherwise that test skips and says why.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi
	@# espeak-ng speaks the test sentences for the Silero VAD exactness tests.
	@if ! command -v espeak-ng >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  echo "installing espeak-ng for the speech tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; \
	fi

# Silero VAD: the official wheel, fetched alone (its torch dependency is never
# installed), and the model directory imported from it. Offline, `make serve`
# still serves the other built-ins and says how to get this one.
SILERO_WHEEL := build/silero_vad-6.2.3-py3-none-any.whl
$(SILERO_WHEEL):
	mkdir -p build
	$(BIN)/python -m pip download -q --no-deps silero-vad==6.2.3 -d build

build/models/silero-vad/model.json: $(SILERO_WHEEL) | $(STAMP)
	$(BIN)/sl-models import silero-vad build/models/silero-vad

silero-vad: $(STAMP)
	@$(MAKE) --no-print-directory build/models/silero-vad/model.json \
	  || echo "silero-vad: could not fetch or import the wheel (offline?); continuing without it"

test: $(STAMP) system-deps silero-vad
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
