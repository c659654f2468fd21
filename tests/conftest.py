"""Test settings shared by the whole suite."""

import jax

# CPU tests must be deterministic and not grab all cores for one op.
jax.config.update("jax_default_matmul_precision", "highest")
