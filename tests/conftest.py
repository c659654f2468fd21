"""Test settings shared by the whole suite."""

import jax
import pytest

# CPU tests must be deterministic.
jax.config.update("jax_default_matmul_precision", "highest")


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
