"""Test settings shared by the whole suite."""

import os
import tempfile

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
