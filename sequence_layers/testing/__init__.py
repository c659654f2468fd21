"""Public test helpers: random inputs and the SequenceLayer contract checker.

`verify_contract(layer, x)` is how every layer in this library is tested, and
how users test their own layers:

    >>> m = MyLayer.Config(...).make()
    >>> layer = init_and_bind(m, x)          # or m.bind(m.init(key, x))
    >>> y = verify_contract(layer, x)        # raises AssertionError on a violation

Floats are compared under one tolerance policy (`tolerances`,
`assert_allclose`): relative AND absolute tolerance, the absolute one scaled
to the values' magnitude, never `rtol` alone (fails near zero on other CPUs).

It checks, in this order (each failure raises AssertionError naming its check
and showing the values):

1. output spec: `layer(x)` has `get_output_spec(x.channel_spec)`, and is not empty;
2. state: `step` keeps the state's pytree structure (node classes included),
   shapes and dtypes (both traced before anything runs);
3. padding invariance: appending `4 * block_size` invalid frames and filling
   every invalid value with NaN changes nothing, layer-wise and step-wise;
4. batching: garbage rows (NaN, all valid) above and below the batch change
   nothing in the real rows, layer-wise and step-wise;
5. receptive field: the declared `receptive_field_per_step` equals the one
   measured from the Jacobian of `layer` (`relaxed_receptive_field`: contains it);
6. leading latency: the first `output_latency` step outputs are invalid;
7. layer/step equivalence at 1x and 2x `block_size`: `layer(x)` equals `step`
   over `x.pad_time(0, input_latency)` minus the first `output_latency`
   outputs (values on valid frames, masks exactly; extra trailing step
   outputs must be invalid);
8. gradients: input and parameter gradients (of the sum of valid outputs)
   agree between layer and step.

All runs are compiled into one program (`jit=True`, the default), since XLA
compilation dominates the cost of small tests; padding invariance, batching
and the 2x block size share one step run, re-run separately only to say which
check failed.

The package is split by concern: `_inputs` (random inputs, numpy input
preparation), `_compare` (sequence comparisons, tolerances, dtype configs),
`_harness` (the compiled harness, `init_and_bind`), `_receptive_field`
(receptive-field measurement) and `_contract` (`verify_contract`). The private
helpers are re-exported here too, so `testing._name` keeps working.
"""

from sequence_layers.testing._compare import _compare_sequences as _compare_sequences
from sequence_layers.testing._compare import _fail as _fail
from sequence_layers.testing._compare import _frame as _frame
from sequence_layers.testing._compare import _is_full_precision as _is_full_precision
from sequence_layers.testing._compare import _rows as _rows
from sequence_layers.testing._compare import assert_allclose as assert_allclose
from sequence_layers.testing._compare import assert_sequences_close as assert_sequences_close
from sequence_layers.testing._compare import get_grad_tols as get_grad_tols
from sequence_layers.testing._compare import standard_dtype_configs as standard_dtype_configs
from sequence_layers.testing._compare import tolerances as tolerances
from sequence_layers.testing._contract import verify_contract as verify_contract
from sequence_layers.testing._harness import _FAST_COMPILE_OPTIONS as _FAST_COMPILE_OPTIONS
from sequence_layers.testing._harness import _copy as _copy
from sequence_layers.testing._harness import _expand_j as _expand_j
from sequence_layers.testing._harness import _Harness as _Harness
from sequence_layers.testing._harness import _run_compiled as _run_compiled
from sequence_layers.testing._harness import _tree_spec as _tree_spec
from sequence_layers.testing._harness import _with_grads as _with_grads
from sequence_layers.testing._harness import init_and_bind as init_and_bind
from sequence_layers.testing._inputs import _expand as _expand
from sequence_layers.testing._inputs import _fill_invalid as _fill_invalid
from sequence_layers.testing._inputs import _garbage_rows as _garbage_rows
from sequence_layers.testing._inputs import _invalid_fill as _invalid_fill
from sequence_layers.testing._inputs import _is_inexact as _is_inexact
from sequence_layers.testing._inputs import _map_sequence_constants as _map_sequence_constants
from sequence_layers.testing._inputs import _np as _np
from sequence_layers.testing._inputs import _np_nan_pad as _np_nan_pad
from sequence_layers.testing._inputs import _np_pad_time as _np_pad_time
from sequence_layers.testing._inputs import _np_pad_to_multiple as _np_pad_to_multiple
from sequence_layers.testing._inputs import _np_sequence as _np_sequence
from sequence_layers.testing._inputs import random_sequence as random_sequence
from sequence_layers.testing._receptive_field import (
    _check_receptive_field as _check_receptive_field,
)
from sequence_layers.testing._receptive_field import _dependencies as _dependencies
from sequence_layers.testing._receptive_field import _rf_probe as _rf_probe
from sequence_layers.testing._receptive_field import _RfProbe as _RfProbe

__all__ = [
    "assert_allclose",
    "assert_sequences_close",
    "get_grad_tols",
    "init_and_bind",
    "random_sequence",
    "standard_dtype_configs",
    "tolerances",
    "verify_contract",
]
