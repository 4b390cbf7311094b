"""Framework-neutral parts of rtdetr-parity, imported by both torch_ref and jittor_impl.

Variant configurations, the shared random stream, state_dict key checking, optimizer
parameter grouping and COCO category maps live here once.
"""

from .configs import VARIANTS, VariantConfig, get_variant
from .random import SharedRandom
from .state_dicts import StateDictMismatchError, TensorSpec, check_state_dict

__all__ = [
    "VARIANTS",
    "VariantConfig",
    "get_variant",
    "SharedRandom",
    "StateDictMismatchError",
    "TensorSpec",
    "check_state_dict",
]
