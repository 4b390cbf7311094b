"""The opt-in precise Jittor kernels (``RTDETR_JITTOR_PRECISE``): parsing and environment set-up.

Only the environment is checked (the flags Jittor reads when it compiles); compiling a second
kernel cache would take minutes.
"""

from __future__ import annotations

import pytest

from jittor_impl import _env
from parity.divergences import jittor_kernels


@pytest.mark.parametrize("value,expected", [("", False), ("0", False), ("1", True)])
def test_precise_flag_values(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv(_env.PRECISE_ENV, value)
    assert _env.precise_kernels_requested() is expected
    assert jittor_kernels() == ("-O3" if expected else "-Ofast")


def test_precise_flag_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_env.PRECISE_ENV, "yes")
    with pytest.raises(ValueError, match="RTDETR_JITTOR_PRECISE='yes'"):
        _env.precise_kernels_requested()


def test_precise_kernels_get_their_own_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("cc_flags", "-g")
    monkeypatch.setenv("cache_name", "default")
    _env._request_precise_kernels()
    assert _env.os.environ["cc_flags"].split() == ["-g", "-O3"]
    assert _env.os.environ["cache_name"] == "default_precise"
    _env._request_precise_kernels()  # idempotent: a child process inherits the same cache
    assert _env.os.environ["cc_flags"].split() == ["-g", "-O3"]
    assert _env.os.environ["cache_name"] == "default_precise"


def test_precise_kernels_refuse_fast_math_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("cc_flags", "-ffast-math")
    monkeypatch.setenv("cache_name", "default")
    with pytest.raises(RuntimeError, match="-ffast-math"):
        _env._request_precise_kernels()
