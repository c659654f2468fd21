"""Test settings shared by the whole suite."""

import os
import tempfile

# The suite compiles thousands of small programs and runs each on tiny
# shapes, so XLA's backend (LLVM) optimizations cost far more than they save:
# level 0 took a fifth off the library tests' wall time on 2 cores. What is
# compared (layer with step, server with offline) is compiled with the same
# flags, to tolerances that do not depend on them; every sl-serve process a
# test starts inherits them. Set before jax initializes its backend.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax
import pytest

# CPU tests must be deterministic.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config: pytest.Config) -> None:
    # Every sl-serve process this run starts shares one fresh compilation
    # cache (xdist workers inherit the environment): the many servers that
    # serve the same built-in models compile each program once, and nothing
    # leaks in from, or out to, the user's own cache.
    if "PYTEST_XDIST_WORKER" not in os.environ and "SL_COMPILE_CACHE_DIR" not in os.environ:
        os.environ["SL_COMPILE_CACHE_DIR"] = tempfile.mkdtemp(prefix="sl-test-compile-cache-")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the long reliability suite (5,000 cycles, 500 clients for 5 minutes)",
    )


@pytest.fixture(scope="session")
def soak(request: pytest.FixtureRequest) -> bool:
    """True under --soak: reliability tests use their long, production-sized settings."""
    return bool(request.config.getoption("--soak"))
