# The two commands a user needs: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast lint format clean system-deps lock silero-vad bench-ref

# Installs are reproducible: exact versions with hashes from the lock files
# (deploy/requirements/*.lock, refreshed by `make lock`), then this project
# itself without resolving anything. pyproject.toml keeps lower bounds only,
# for people who use the library in their own environments.
LOCK := deploy/requirements/test.lock
UV := uv==0.13.9

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
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
VAD_LOCK := deploy/requirements/vad.lock
$(SILERO_WHEEL):
	mkdir -p build
	sed -n '/^silero-vad==/,$$p' $(VAD_LOCK) > build/silero-vad.req
	$(BIN)/python -m pip download -q --no-deps --require-hashes --only-binary :all: \
	  -r build/silero-vad.req -d build

build/models/silero-vad/model.json: $(SILERO_WHEEL) | $(STAMP)
	$(BIN)/sl-models import silero-vad build/models/silero-vad

silero-vad: $(STAMP)
	@$(MAKE) --no-print-directory build/models/silero-vad/model.json \
	  || echo "silero-vad: could not fetch or import the wheel (offline?); continuing without it"

test: $(STAMP) system-deps silero-vad
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

# The inner loop: the library and runtime tests, without the suites that
# start server processes and browsers (those run in `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m "not e2e" $(PYTEST_ARGS)

# Re-resolves the newest versions pyproject.toml allows and rewrites both
# lock files (serve.lock: the server's own dependencies, for the Docker
# image; test.lock: plus the test extra, for make serve/test and CI). Run
# `make test` afterwards and commit the locks with what they changed.
lock: $(STAMP)
	$(BIN)/python -m pip install -q $(UV)
	$(BIN)/uv pip compile pyproject.toml --extra test --generate-hashes --universal \
	  --fork-strategy fewest --python-version 3.11 --upgrade -q -o deploy/requirements/test.lock
	$(BIN)/uv pip compile pyproject.toml --generate-hashes --universal \
	  --fork-strategy fewest --python-version 3.11 -c deploy/requirements/test.lock -q \
	  -o deploy/requirements/serve.lock
	@# vad.lock: test.lock's onnx block (same version and hashes) and the wheel's pin.
	{ sed -n '/^#/p' $(VAD_LOCK); \
	  awk '/^onnx==/{p=1; print; next} p && /^[^ ]/{exit} p && !/^ *#/' deploy/requirements/test.lock; \
	  sed -n '/^silero-vad==/,$$p' $(VAD_LOCK); } > build/vad.lock && mv build/vad.lock $(VAD_LOCK)

# This library against google/sequence-layers, side by side; the reference is
# installed into build/ref-venv on first use (never a project dependency).
bench-ref: $(STAMP)
	$(BIN)/python -m loadtests.bench_vs_reference $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
