"""The fused (``torch.compile``) codec tails: off the CPU path by default, the eager path when they fail, and the
same bits as the eager path (exercised on the CPU through inductor's C++ backend; on CUDA by
``fused_codecs.check_against_eager("cuda")``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_codec_parity import _pair, _ref_quantize_, _ref_round_bf16_, _values

from lowrank_optim import fused_codecs as F
from lowrank_optim import state as S

CPU = torch.device("cpu")


@pytest.fixture
def fused_state(monkeypatch: pytest.MonkeyPatch):
    """Restores the module's switches and counters after a test that changes them."""
    monkeypatch.setattr(F, "DEVICES", set(F.DEVICES))
    monkeypatch.setattr(F, "BROKEN", None)
    monkeypatch.setattr(F, "ENABLED", True)
    monkeypatch.setattr(F, "_COMPILED", {})
    return F


def test_the_cpu_path_does_not_use_the_fused_tails(fused_state) -> None:
    before = F.CALLS
    x = _values((64, 72), seed=1)
    S.quantize_blockwise_sr_(*_pair((64, 72), x.numel()), x, S.qmap(True, CPU), 3)
    S.stochastic_round_bf16_(torch.empty(64, 72, dtype=torch.bfloat16), x, 3)
    assert "cpu" not in F.DEVICES
    assert not F.usable(x)
    served = F.CALLS - before
    assert served == 0 and not F._COMPILED


def test_a_failing_compile_falls_back_to_the_eager_bits_and_stays_off(fused_state) -> None:
    F.DEVICES.add("cpu")

    def broken(*args: torch.Tensor) -> None:
        raise RuntimeError("no compiler")

    F._COMPILED.update({name: broken for name in ("8bit", "bf16", "8bit-range", "bf16-range")})
    x = _values((40, 300), seed=2)
    want_codes, want_absmax = _pair((40, 300), x.numel())
    _ref_quantize_(want_codes, want_absmax, x, S.qmap(True, CPU), 77)
    got_codes, got_absmax = _pair((40, 300), x.numel())
    with pytest.warns(RuntimeWarning, match="no compiler"):
        S.quantize_blockwise_sr_(got_codes, got_absmax, x, S.qmap(True, CPU), 77)
    assert torch.equal(got_codes, want_codes)
    assert F.BROKEN == "RuntimeError: no compiler"
    assert not F.usable(x)  # off for the process: the bf16 codec does not try again
    want = _ref_round_bf16_(torch.empty(40, 300, dtype=torch.bfloat16), x, 77)
    got = S.stochastic_round_bf16_(torch.empty(40, 300, dtype=torch.bfloat16), x, 77)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_tails_give_the_eager_bits_on_the_cpu(fused_state) -> None:
    """The compiled graphs (inductor's C++ backend standing in for triton) write the oracle's codes and bits:
    whole tensors, a ragged shard with its origin, the folded positive floor, keys across 2^31 and 2^32."""
    F.DEVICES.add("cpu")
    before = F.CALLS
    served = 0
    for shape, origin, global_shape in [((64, 72), None, None), ((17, 300), (40, 0), (80, 300))]:
        x = _values(shape, seed=9)
        where = {"origin": origin, "global_shape": global_shape}
        for key in (0, 2**31 - 3, 2**32 - 1):
            for signed in (True, False):
                value = x if signed else x.abs()
                floor = S.first_positive_code(signed)
                want_codes, want_absmax = _pair(shape, x.numel())
                _ref_quantize_(want_codes, want_absmax, value, S.qmap(signed, CPU), key, positive_floor=floor, **where)
                got_codes, got_absmax = _pair(shape, x.numel())
                S.quantize_blockwise_sr_(got_codes, got_absmax, value, S.qmap(signed, CPU), key,
                                         positive_floor=floor, **where)
                assert torch.equal(got_codes, want_codes), (shape, key, signed)
            want = _ref_round_bf16_(torch.empty(shape, dtype=torch.bfloat16), x, key, **where)
            got = S.stochastic_round_bf16_(torch.empty(shape, dtype=torch.bfloat16), x, key, **where)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (shape, key)
            served += 3
    assert F.BROKEN is None
    assert F.CALLS - before == served


def test_absmax_comparison_takes_any_nan_as_equal_and_nothing_else() -> None:
    a = torch.tensor([1.0, float("nan"), -0.0])
    other_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)[0]
    assert F._same_bits(a, torch.tensor([1.0, float(other_nan), -0.0]))
    assert not F._same_bits(a, torch.tensor([1.0, float("nan"), 0.0]))  # -0.0 and 0.0: other bits
    assert not F._same_bits(a, torch.tensor([1.0, 2.0, -0.0]))
