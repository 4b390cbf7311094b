"""The one conversion of framework tensors to numpy that the harness uses."""

from __future__ import annotations

from typing import Any


def to_numpy(tree: Any) -> Any:
    """torch tensors, Jittor Vars and recorded tensors -> numpy arrays, in nested dicts, lists
    and tuples; other leaves unchanged.

    A leaf with ``detach`` is a torch tensor (detached and moved to the CPU first); a leaf with
    ``numpy`` (a Jittor Var, or a recorded tensor that checks itself) gives its array.
    """
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    if hasattr(tree, "detach"):  # torch.Tensor
        return tree.detach().cpu().numpy()
    if hasattr(tree, "numpy"):  # jittor.Var, a recorded tensor
        return tree.numpy()
    return tree
