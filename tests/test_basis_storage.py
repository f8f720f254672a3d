"""Quantized projector bases (``basis_dtype``): codec bounds, every basis projector, bytes, resume, planner."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_continuation, make_model, resume_copy, roundtrip, train

import lowrank_optim as lro
from lowrank_optim.memory import LLAMA_CONFIGS, llama_shapes
from lowrank_optim.projectors import make_projector
from lowrank_optim.projectors.quantized_basis import BLOCK, basis_bytes, decode_basis, encode_basis

#: Every projector that stores a basis, with options for the tiny model (GUM: one of the two matrices full-rank).
BASIS_PROJECTORS = {"svd": {}, "rsvd": {}, "coap": {}, "gum": {"full_rank_layers": 1}}
QUANTIZED = ("bf16", "int8", "int4")
#: (projector, basis_dtype) pairs that are accepted: GUM's full branch steps the complement, which an int4 basis
#: fills with quantization error (refused, test_complement_floor.py)
STORED = [(name, dt) for name in sorted(BASIS_PROJECTORS) for dt in QUANTIZED if (name, dt) != ("gum", "int4")]


@pytest.mark.parametrize("d", [1, 7, BLOCK, BLOCK + 3, 2 * BLOCK + 1])
@pytest.mark.parametrize("basis_dtype", ["fp32", *QUANTIZED])
def test_codec_error_bounds_and_bytes(d: int, basis_dtype: str) -> None:
    """int8 / int4: the codes are round-to-nearest of x / (absmax(block) / L), L = 127 or 7; each column's scales
    carry one factor f making the decoded column's norm the fp32 one's, so |x - decode(encode(x))| <=
    absmax / (2 L) + |1 - f| absmax. bf16 within half an ulp; bytes of the stored tensors equal
    :func:`basis_bytes`; encoding is deterministic."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(d, 3, generator=gen)
    x[:, 1] = 0.0  # an all-zero column decodes to zeros
    enc = encode_basis(x, basis_dtype)
    y = decode_basis(enc)
    assert y.dtype == torch.float32 and y.shape == x.shape
    stored = sum(v.numel() * v.element_size() for v in enc.values() if isinstance(v, torch.Tensor))
    assert stored == basis_bytes(d, 3, basis_dtype)
    assert torch.equal(y[:, 1], torch.zeros(d))
    if basis_dtype == "fp32":
        assert torch.equal(y, x)
    elif basis_dtype == "bf16":
        assert torch.allclose(y, x, rtol=2**-8, atol=0)
    else:
        levels = 127 if basis_dtype == "int8" else 7
        nb = math.ceil(d / BLOCK)
        pad = torch.cat([x, x.new_zeros(nb * BLOCK - d, 3)]).view(nb, BLOCK, 3)
        absmax = pad.abs().amax(dim=1, keepdim=True)
        step = torch.where(absmax > 0, absmax / levels, 1.0)
        codes = torch.round(pad / step)
        rounded = (codes * step).view(nb * BLOCK, 3)[:d]
        code_of = (lambda e: e["basis"].float()) if basis_dtype == "int8" else None
        if code_of is not None:
            assert torch.equal(code_of(enc), codes.view(nb * BLOCK, 3)[:d])
        f = torch.where(rounded.norm(dim=0) > 0, x.norm(dim=0) / rounded.norm(dim=0).clamp(min=1e-30), 1.0)
        absmax_rows = absmax.expand(nb, BLOCK, 3).reshape(-1, 3)[:d]
        bound = absmax_rows / (2 * levels) + (1 - f).abs() * absmax_rows
        assert ((y - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()
        assert torch.allclose(y.norm(dim=0), x.norm(dim=0), rtol=2e-6, atol=0)
    again = encode_basis(x, basis_dtype)
    for k, v in enc.items():
        assert torch.equal(v, again[k]) if isinstance(v, torch.Tensor) else v == again[k]


@pytest.mark.parametrize("basis_dtype", ["int8", "int4"])
def test_decoded_columns_keep_their_norm(basis_dtype: str) -> None:
    """Round to nearest alone makes a unit column's squared norm 1 + d step^2 / 12 on average (int4, d = 256: about
    +1.5%, so every lifted step was ~0.8% too long); the per-column factor brings it back to 1 within fp32
    rounding while the codes stay round-to-nearest."""
    gen = torch.Generator().manual_seed(0)
    p, _ = torch.linalg.qr(torch.randn(BLOCK, 32, generator=gen))  # one block per column
    q = decode_basis(encode_basis(p, basis_dtype))
    assert torch.allclose(q.norm(dim=0), torch.ones(32), rtol=0, atol=2e-6)
    levels = 127 if basis_dtype == "int8" else 7
    step = p.abs().amax(dim=0) / levels
    naive = torch.round(p / step) * step
    excess = float(naive.square().sum(0).mean()) - 1.0
    assert excess > (0.005 if basis_dtype == "int4" else 0.0)  # the bias the factor removes
    assert torch.allclose(q, naive * (1.0 / naive.norm(dim=0)), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "basis_dtype"), STORED)
def test_projection_uses_the_decoded_basis(name: str, basis_dtype: str) -> None:
    """The stored form is what projects: ``project(G) = B^T G`` / ``G B`` with ``B = decode(state)``, and the
    basis is the fp32 one rounded (same ``init`` otherwise)."""
    torch.manual_seed(0)
    g = torch.randn(24, 40)
    layout = {"layout": (0, 2, 0)} if name == "gum" else {}
    exact = make_projector(name, 5, **BASIS_PROJECTORS[name]).init(g, seed=3, **layout)
    proj = make_projector(name, 5, basis_dtype=basis_dtype, **BASIS_PROJECTORS[name])
    st = proj.init(g, seed=3, **layout)
    b = decode_basis(st)
    assert st["basis"].dtype != torch.float32
    assert torch.equal(b, decode_basis(encode_basis(exact["basis"], basis_dtype)))
    if name == "gum" and st["full"]:
        return
    low = proj.project(g, st)
    if name == "gum":
        low = low / proj.weight(st)  # GUM weights the low-rank branch by 1 / (1 - q)
    assert torch.equal(low, b.T @ g if st["side"] == 0 else g @ b)


def _groups(model: torch.nn.Module, basis_dtype: str, projector: str, **options) -> list[dict]:
    return lro.param_groups(model, rank=8, target_modules=["attn", "mlp"], update_proj_gap=3, projector=projector,
                            projector_options={"basis_dtype": basis_dtype, **options})


@pytest.mark.parametrize(("name", "basis_dtype"), STORED)
def test_state_bytes_closed_form_and_bit_exact_resume(name: str, basis_dtype: str) -> None:
    """GaLore-AdamW (GUM for the gum projector) with quantized bases: ``state_bytes()`` = moments + the basis
    closed form; across refreshes a weights_only round trip keeps codes' dtypes and resumes bit-exactly."""
    optimizer = "gum" if name == "gum" else "galore_adamw"

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        opts = {k: v for k, v in BASIS_PROJECTORS[name].items()} if name != "gum" else {}
        kwargs = {"full_rank_layers": 1} if name == "gum" else {}
        return lro.create_optimizer(optimizer, _groups(model, basis_dtype, name, **opts), lr=1e-2, **kwargs)

    model = make_model()
    opt = make(model)
    train(model, opt, 4)  # one refresh at step 3
    expected = 0
    store = lro.StateStore("fp32")
    for p in model.parameters():
        st = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if k in st:
                expected += store.bytes_for(st[k].numel())
        if "projector" in st and "basis" in st["projector"]:
            pst = st["projector"]
            m, n = p.shape
            d = m if pst["side"] == 0 else n
            expected += basis_bytes(d, pst["rank"], basis_dtype)
            assert pst["basis"].dtype == {"bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[basis_dtype]
    assert opt.state_bytes() == expected
    model2, opt2 = resume_copy(model, opt, make)
    assert_same_continuation(model, opt, model2, opt2, 5)


def test_refusals_name_the_option() -> None:
    with pytest.raises(ValueError, match="basis_dtype"):
        make_projector("svd", 4, basis_dtype="int2")
    for name in ("random", "dct", "columns", "blocks", "online_pca"):
        with pytest.raises(ValueError, match="basis_dtype"):
            make_projector(name, 4, basis_dtype="int8")
    with pytest.raises(ValueError, match="basis_dtype"):
        lro.GaLoreAdamW([{"params": [torch.nn.Parameter(torch.randn(4, 6))], "rank": 2}], projector="random",
                        projector_options={"basis_dtype": "bf16"})


def test_planner_reports_quantized_bases_llama_7b() -> None:
    """LLaMA-7B, GaLore 8-bit, rank 1024, layer-wise: 224 bases of 4096 x 1024 are 3.76 GB in fp32 (21.32 GB in
    all); int8 bases equal their closed form (0.95 GB) and the rest of the plan does not move."""
    plans = {dt: lro.plan_memory("llama-7b", "galore_adamw", rank=1024, state_dtype="8bit", layerwise=True,
                                 basis_dtype=dt) for dt in ("fp32", "int8")}
    shapes = llama_shapes(**LLAMA_CONFIGS["7B"])
    n = sum(1 for k, s in shapes.items() if len(s) == 2 and ("attn" in k or "mlp" in k))
    assert n == plans["fp32"].n_lowrank == 224
    for dt, plan in plans.items():
        assert plan.state["projector bases"] == n * basis_bytes(4096, 1024, dt)
        assert plan.total - plan.state["projector bases"] == \
            plans["fp32"].total - plans["fp32"].state["projector bases"]
    assert round(plans["fp32"].state["projector bases"] / 1e9, 2) == 3.76
    assert round(plans["fp32"].total / 1e9, 2) == 21.32
    assert round(plans["int8"].state["projector bases"] / 1e9, 2) == 0.95
    assert "projector bases (int8)" in plans["int8"].format()


def test_weights_only_load_keeps_code_dtypes() -> None:
    model = make_model()
    opt = lro.GaLoreAdamW(_groups(model, "int4", "svd"), lr=1e-2)
    train(model, opt, 1)
    sd = roundtrip(opt.state_dict())
    opt2 = lro.GaLoreAdamW(_groups(make_model(), "int4", "svd"), lr=1e-2)
    opt2.load_state_dict(sd)
    pst = next(st["projector"] for st in opt2.state.values() if "projector" in st)
    assert pst["basis"].dtype == torch.uint8 and pst["basis_scale"].dtype == torch.float32
    assert isinstance(pst["basis_rows"], int)
