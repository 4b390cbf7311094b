"""The parity harness: one set of weights in torch_ref and jittor_impl, everything compared.

Importing :mod:`jittor_impl` first prepares Jittor's offline environment, so every parity
module may ``import jittor`` afterwards.
"""

import jittor_impl  # noqa: F401
