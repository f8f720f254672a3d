"""Numbers of any numeric type, stored plain; groups re-validated when changed after construction."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import pytest
import torch

import lowrank_optim as lro
from lowrank_optim._validation import check_int, check_number, plain


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(2), Fraction(1, 2), 2, 0.5,
                                   torch.tensor(0.5), torch.tensor([0.5]), torch.tensor(2)])
def test_check_number_accepts_reals_as_plain_float(value: object) -> None:
    out = check_number("x", value, low=0.0)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [np.int64(4), np.int32(4), np.uint8(4), 4, torch.tensor(4), torch.tensor([4])])
def test_check_int_accepts_integrals_as_plain_int(value: object) -> None:
    out = check_int("x", value, low=1)
    assert type(out) is int and out == 4


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), "1", None, 1 + 0j])
def test_check_number_refuses_non_reals(value: object) -> None:
    with pytest.raises(TypeError, match="Invalid x"):
        check_number("x", value)


@pytest.mark.parametrize("value", [True, np.bool_(True), 4.0, np.float32(4.0), torch.tensor(4.0), "4"])
def test_check_int_refuses_non_integrals(value: object) -> None:
    with pytest.raises(TypeError, match="Invalid x"):
        check_int("x", value)


def test_plain_unwraps_numpy_inside_containers() -> None:
    out = plain({"a": (np.float64(0.5), np.int64(3)), "b": [np.float32(0.25)], "c": "s", "d": True})
    assert out == {"a": (0.5, 3), "b": [0.25], "c": "s", "d": True}
    assert type(out["a"][0]) is float and type(out["a"][1]) is int and type(out["b"][0]) is float


def _roundtrip(opt: torch.optim.Optimizer) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cast", [np.float32, np.float64, torch.tensor])
def test_numpy_and_tensor_hyperparameters_are_stored_plain(cast) -> None:
    """``lr`` / ``eps`` / ``betas`` / ``rank`` / ``update_proj_gap`` / ``weight_decay`` of NumPy or tensor type:
    accepted, stepped to the same weights as Python numbers, stored as Python numbers, weights_only-loadable."""
    torch.manual_seed(0)
    w0 = torch.randn(8, 6)
    g = torch.randn(8, 6)
    out = []
    for numeric in (False, True):
        c = cast if numeric else (lambda x: x)
        ci = (np.int64 if cast is not torch.tensor else torch.tensor) if numeric else (lambda x: x)
        w = torch.nn.Parameter(w0.clone())
        opt = lro.GaLoreAdamW([{"params": [w], "rank": ci(4), "update_proj_gap": ci(2)}], lr=c(1e-2),
                              eps=c(1e-8), betas=(c(0.9), c(0.99)), weight_decay=c(0.1))
        for _ in range(3):
            w.grad = g.clone()
            opt.step()
        out.append(w.detach().clone())
        group = opt.param_groups[0]
        for key in ("lr", "eps", "weight_decay"):
            assert type(group[key]) is float, key
        for key in ("rank", "update_proj_gap"):
            assert type(group[key]) is int, key
        assert all(type(b) is float for b in group["betas"])
        _roundtrip(opt)
    # float32 lr / betas round to nearby doubles: same trajectory to rounding
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_numpy_projector_options_and_preset_arguments_are_stored_plain() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = lro.GaLoreAdamW([w], rank=np.int64(2), projector="rsvd",
                          projector_options={"oversample": np.int64(2), "power_iters": np.int32(1)})
    w.grad = torch.randn_like(w)
    opt.step()
    opts = opt.param_groups[0]["projector_options"]
    assert opts == {"oversample": 2, "power_iters": 1} and all(type(v) is int for v in opts.values())
    _roundtrip(opt)


def test_torch_accepts_tensor_lr_and_so_do_we() -> None:
    """torch.optim.AdamW takes a 0-d tensor lr (for capturable / fused); we take it and store the float (the
    engine computes per-step scalars on the host)."""
    w = torch.nn.Parameter(torch.randn(4, 3))
    torch.optim.AdamW([w], lr=torch.tensor(1e-3))
    opt = lro.GaLoreAdamW([w], lr=torch.tensor(1e-3))
    assert type(opt.param_groups[0]["lr"]) is float and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(TypeError, match="Invalid lr"):
        lro.GaLoreAdamW([w], lr=torch.tensor([1e-3, 1e-3]))


@pytest.mark.parametrize("where", ["default", "group"])
def test_lr_none_refused_at_construction(where: str) -> None:
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="Invalid lr: None"):
        if where == "default":
            lro.GaLoreAdamW([w], lr=None)
        else:
            lro.GaLoreAdamW([{"params": [w]}], lr=None)
    with pytest.raises(ValueError, match="Invalid lr: None"):
        lro.FRUGAL([{"params": [w], "rank": 2}], lr=None, projector="columns")
    # Adafactor's relative step computes its own lr: still allowed
    lro.GaLoreAdafactor([w], lr=None, relative_step=True)


CHANGED = [("scale", "abc", TypeError, "Invalid scale"), ("update_proj_gap", 0, ValueError, "Invalid update_proj_gap"),
           ("lr", None, ValueError, "Invalid lr: None"), ("lr", -1.0, ValueError, "Invalid lr"),
           ("lr", "1e-3", TypeError, "Invalid lr"), ("betas", (0.9, 2.0), ValueError, r"Invalid betas\[1\]"),
           ("projector", "nope", ValueError, "Invalid projector"), ("rank", 0, ValueError, "Invalid rank"),
           ("weight_decay", float("nan"), ValueError, "Invalid weight_decay"),
           ("state_dtype", "fp8", ValueError, "Invalid state_dtype")]


@pytest.mark.parametrize(("key", "value", "error", "match"), CHANGED)
def test_group_value_changed_after_construction_fails_clearly_before_any_change(key, value, error, match) -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6))
    b = torch.nn.Parameter(torch.randn(6))
    opt = lro.GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 2}])
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    before = [w.detach().clone(), b.detach().clone(), opt.state[w]["exp_avg"].clone()]
    opt.param_groups[1][key] = value  # the second group: the first must not have stepped either
    with pytest.raises(error, match=match):
        opt.step()
    assert torch.equal(w, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.state[w]["exp_avg"], before[2]) and opt.state[b]["step"] == 1


def test_valid_change_after_construction_is_taken_and_stored_plain() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = lro.GaLoreAdamW([w], rank=2, update_proj_gap=100)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.param_groups[0]["update_proj_gap"] = np.int64(1)
    opt.param_groups[0]["lr"] = np.float32(0.5)
    opt.step()
    assert type(opt.param_groups[0]["update_proj_gap"]) is int and type(opt.param_groups[0]["lr"]) is float


def test_scheduler_lr_changes_never_revalidate(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float lr set every step (an LR scheduler) is checked alone: the full validation does not run again."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = lro.GaLoreAdamW([w], rank=2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    calls = []
    original = type(opt)._validate_group
    monkeypatch.setattr(type(opt), "_validate_group", lambda self, g: calls.append(1) or original(self, g))
    for _ in range(4):
        w.grad = torch.randn_like(w)
        opt.step()
        sched.step()
    assert calls == []
    opt.param_groups[0]["scale"] = 0.5
    w.grad = torch.randn_like(w)
    opt.step()
    assert calls == [1]


#: (preset, argument the user writes, a bad value, error): arguments a preset renames or forwards to an engine key
#: or a projector option of another name; the error must name the argument as written.
RENAMED = [
    (lro.Flora, "kappa", 0, ValueError), (lro.Flora, "kappa", 2.5, TypeError),
    (lro.FRUGAL, "update_gap", 0, ValueError), (lro.FRUGAL, "proj_params_lr_scale", 0.0, ValueError),
    (lro.FRUGAL, "proj_params_lr_scale", "x", TypeError), (lro.FRUGAL, "block_order", "sideways", ValueError),
    (lro.FRUGAL, "reset_statistics", 1, TypeError), (lro.FRUGAL, "inactive_update_rule", "x", ValueError),
    (lro.COAP, "update_interval", 0, ValueError), (lro.COAP, "restore_state", 1, TypeError),
    (lro.OnlineSubspaceDescent, "p_lr_rule", "x", ValueError),
    (lro.OnlineSubspaceDescent, "p_optimizer", "lion", ValueError),
    (lro.OnlineSubspaceDescent, "p_lr_ratio", -1.0, ValueError), (lro.OnlineSubspaceDescent, "p_lr", -1.0, ValueError),
    (lro.OnlineSubspaceDescent, "p_weight_decay", -1.0, ValueError),
    (lro.DCTAdamW, "dct_path", "x", ValueError), (lro.DCTAdamW, "dct_score", "x", ValueError),
    (lro.GaLoreAdamW, "proj_type", "x", ValueError),
]


@pytest.mark.parametrize(("cls", "arg", "value", "error"), RENAMED,
                         ids=[f"{c.__name__}-{a}-{v!r}" for c, a, v, _ in RENAMED])
def test_preset_errors_name_the_argument_written(cls, arg: str, value: object, error: type) -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(error, match=rf"^Invalid {arg}: "):
        cls([{"params": [w], "rank": 2}], **{arg: value})


def test_group_proj_type_error_names_proj_type() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"^Invalid proj_type: 'x'"):
        lro.GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "x"}])


def test_projector_option_errors_name_the_option_written() -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=r"^Invalid order: 'x'"):
        lro.FRUGAL([{"params": [w], "rank": 2}], projector_options={"order": "x"})


def _adamw_trained(params: list, steps: int = 3, **kw) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(params, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt


def test_torch_adamw_state_of_plain_parameters_converts_exactly() -> None:
    """A plain parameter's AdamW state becomes our Adam state: the next step equals AdamW's bit for bit, and the
    group takes the saved lr / weight_decay / betas / eps."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    adamw = _adamw_trained([w, b], lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6)
    ours = lro.GaLoreAdamW([w, b])
    ours.load_state_dict(adamw.state_dict())
    group = ours.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (1e-2, 0.1, (0.8, 0.99), 1e-6)
    assert "amsgrad" not in group and group["inner"] == "adam"
    assert ours.state[w]["step"] == 3 and ours.state[w]["inner_step"] == 3 and type(ours.state[w]["step"]) is int
    start = [w.detach().clone(), b.detach().clone()]
    grads = [torch.randn_like(w), torch.randn_like(b)]
    results = []
    for opt in (ours, adamw):
        with torch.no_grad():
            w.copy_(start[0])
            b.copy_(start[1])
        w.grad, b.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        results.append((w.detach().clone(), b.detach().clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    _roundtrip(ours)


def test_torch_adamw_state_of_a_projected_parameter_is_refused_by_name() -> None:
    w, b = torch.nn.Parameter(torch.randn(8, 6)), torch.nn.Parameter(torch.randn(6))
    adamw = _adamw_trained([{"params": [b]}, {"params": [w]}])
    ours = lro.GaLoreAdamW([{"params": [b]}, {"params": [w], "rank": 2}])
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(8, 6\)\).*'exp_avg', 'exp_avg_sq', 'step'.*"
                                         r"projects it \(rank 2\)"):
        ours.load_state_dict(adamw.state_dict())
    assert not ours.state and ours.param_groups[1]["rank"] == 2  # nothing loaded


@pytest.mark.parametrize("case", ["amsgrad", "sgd_state", "bf16_store", "adafactor", "adam_l2"])
def test_foreign_state_that_cannot_convert_is_refused_by_name(case: str) -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    if case == "amsgrad":
        sd, ours, match = _adamw_trained([w], amsgrad=True).state_dict(), lro.GaLoreAdamW([w]), "amsgrad=True"
    elif case == "sgd_state":
        sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        w.grad = torch.randn_like(w)
        sgd.step()
        sd, ours, match = sgd.state_dict(), lro.GaLoreAdamW([w]), r"parameter 0 .*\['momentum_buffer'\].*expects"
    elif case == "adam_l2":
        adam = torch.optim.Adam([w], weight_decay=0.1)
        w.grad = torch.randn_like(w)
        adam.step()
        sd, ours, match = adam.state_dict(), lro.GaLoreAdamW([w]), "weight_decay=0.1 added to the gradient"
    elif case == "bf16_store":
        sd, ours = _adamw_trained([w]).state_dict(), lro.GaLoreAdamW([w], state_dtype="bf16")
        match = "state_dtype='bf16'"
    else:
        sd, ours = _adamw_trained([w]).state_dict(), lro.GaLoreAdafactor([w])
        match = "inner='adafactor'"
    with pytest.raises(ValueError, match=match):
        ours.load_state_dict(sd)


def test_own_state_still_loads_bit_exact_with_experts() -> None:
    """Our own state (per-matrix ``inner_step``, MoE stacks' ``matrices``) is not taken for a foreign one."""
    torch.manual_seed(0)
    e, b = torch.nn.Parameter(torch.randn(3, 8, 6)), torch.nn.Parameter(torch.randn(6))
    opt = lro.GaLoreAdamW([{"params": [b]}, {"params": [e], "rank": 2}])
    e.grad, b.grad = torch.randn_like(e), torch.randn_like(b)
    opt.step()
    other = lro.GaLoreAdamW([{"params": [b]}, {"params": [e], "rank": 2}])
    other.load_state_dict(_roundtrip(opt))
    assert other.state[e]["step"] == 1 and len(other.state[e]["matrices"]) == 3


@pytest.mark.parametrize("options", [{"lazy_threshold": 0.5}, {"lazy_max_multiple": 4}])
def test_lazy_schedule_settings_without_lazy_refresh_are_refused(options: dict) -> None:
    w = torch.nn.Parameter(torch.randn(8, 6))
    key = next(iter(options))
    with pytest.raises(ValueError, match=rf"^Invalid {key}: .* without lazy_refresh=True"):
        lro.GaLoreAdamW([w], rank=2, projector_options=options)
    lro.GaLoreAdamW([w], rank=2, projector_options={**options, "lazy_refresh": True})
    # a group turning off an inherited lazy schedule keeps the inherited settings: accepted
    opt = lro.GaLoreAdamW([{"params": [w], "projector_options": {"lazy_refresh": False}}], rank=2,
                          projector_options={**options, "lazy_refresh": True})
    assert opt._parts(opt.param_groups[0]).projector.lazy is None


def test_include_conv_without_target_modules_is_refused() -> None:
    w = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"^Invalid include_conv: True without target_modules"):
        lro.GaLoreAdamW([w], rank=2, include_conv=True)
    lro.GaLoreAdamW([w], rank=None, include_conv=False)


def test_python_m_runs_the_planner_without_a_runpy_warning() -> None:
    import subprocess
    import sys

    for module in ("lowrank_optim", "lowrank_optim.planner"):
        out = subprocess.run([sys.executable, "-W", "error", "-m", module, "--help"], capture_output=True, text=True,
                             check=False)
        assert out.returncode == 0 and "estimate" in out.stdout and "Warning" not in out.stderr, out.stderr


def test_all_linear_warning_says_what_all_linear_projects() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 8),
                                torch.nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"^target_modules='all-linear' projects nn.Linear weights and MoE expert "
                                         r"stacks only; .*0\.weight \(Conv2d"):
        lro.param_groups(model, rank=2, target_modules="all-linear")


@pytest.mark.parametrize(("cls", "key", "value", "projector"), [
    (lro.GUM, "weighting", "after", "gum"), (lro.GUM, "full_rank_prob", 0.3, "gum"),
    (lro.FRUGAL, "density", 0.5, "blocks"), (lro.GaLorePlus, "num_heads", 2, "rsvd_heads"),
    (lro.GaLoreAdamW, "solver", "gram", "svd"), (lro.GaLoreAdamW, "basis_dtype", "int8", "svd"),
    (lro.COAP, "reproject_factor", 2, "coap")])
def test_projector_option_as_a_group_key_is_refused(cls: type, key: str, value: object, projector: str) -> None:
    """A projector's option written as a plain group key was never passed to the projector (silently ignored):
    refused, naming the key, its value, the projector and where it belongs. Group keys the engine or a rule reads
    (Online Subspace Descent's betas: the group's Adam) and foreign keys (a user's tag) stay accepted."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=rf"'{key}'.*{projector!r}.*projector_options"):
        cls([{"params": [w], "rank": 2, key: value}])
    opt = cls([{"params": [w], "rank": 2, "my_tag": "attention"}])
    assert opt.param_groups[0]["my_tag"] == "attention"
    # the value the projector got is harmless (ZeroRedundancyOptimizer copies the optimizer's kwargs into groups)
    opts = {key: value, **({"full_rank_layers": None} if key == "full_rank_prob" else {})}  # GUM: exactly one
    cls([{"params": [w], "rank": 2, key: value, "projector_options": opts}])
    lro.OnlineSubspaceDescent([{"params": [w], "rank": 2, "betas": (0.9, 0.99)}])
    if cls is lro.GaLoreAdamW:
        opt = cls([{"params": [w], "rank": 2, "projector_options": {key: value}}])
        assert getattr(opt._parts(opt.param_groups[0])[0], key) == value


@pytest.mark.parametrize(("cls", "projector"), [(lro.GUM, "gum"), (lro.FRUGAL, "blocks")])
def test_refresh_stagger_refused_for_group_wide_draws(cls: type, projector: str) -> None:
    """GUM's full-rank draw and FRUGAL's active blocks are chosen for the whole group at once: staggered phases
    would overlap two periods' choices (3 full-rank matrices with gamma = 1; twice FRUGAL's state), so the
    combination is refused by name, at construction and when set on a group later."""
    ws = [torch.nn.Parameter(torch.randn(12, 8)) for _ in range(4)]
    with pytest.raises(ValueError, match=rf"refresh_stagger.*{projector!r}"):
        cls([{"params": ws, "rank": 2}], refresh_stagger=True)
    opt = cls([{"params": ws, "rank": 2}])
    opt.param_groups[0]["refresh_stagger"] = True
    for w in ws:
        w.grad = torch.randn(12, 8)
    with pytest.raises(ValueError, match="refresh_stagger"):
        opt.step()
    lro.GaLoreAdamW([{"params": ws, "rank": 2}], refresh_stagger=True)  # a per-matrix refresh staggers


@pytest.mark.parametrize("key", ["lr", "scale", "weight_decay", "eps"])
@pytest.mark.parametrize("value", [float("inf"), -float("inf"), np.float32("inf")])
def test_infinite_hyperparameters_refused(key: str, value: float) -> None:
    """NaN was refused by name and infinity accepted: ``lr``, ``scale`` or ``weight_decay`` of inf made every weight
    non-finite on the first step. Refused at construction, naming the key."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=rf"Invalid {key}: .*(finite|>)"):
        lro.GaLoreAdamW([{"params": [w], "rank": 2}], **{key: value})
    with pytest.raises(ValueError, match="finite"):
        check_number(key, value)


def test_target_modules_without_rank_refused() -> None:
    """``target_modules`` names the weights to project, but only a group with ``rank`` is projected: without any
    rank every weight kept full Adam state without a word (the registry route defaults to rank 128)."""
    model = torch.nn.Sequential()
    model.add_module("attn", torch.nn.Linear(8, 6))
    with pytest.raises(ValueError, match=r"target_modules.*without rank"):
        lro.GaLoreAdamW(model.parameters(), target_modules=["attn"], module=model)
    opt = lro.GaLoreAdamW(model.parameters(), target_modules=["attn"], module=model, rank=2)
    assert opt.param_groups[0]["rank"] == 2


def test_preset_rule_settings_with_another_inner_rule_explained() -> None:
    """GaLoreAdamW passes Adam's betas and eps: with ``inner="muon"`` nothing reads them, and the error says so and
    how to keep Adam for the plain parameters (which then works)."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(TypeError, match=r"\['betas', 'eps'\].*plain_inner='adam'"):
        lro.GaLoreAdamW([{"params": [w], "rank": 2}], inner="muon")
    lro.GaLoreAdamW([{"params": [w], "rank": 2}], inner="muon", plain_inner="adam")


@pytest.mark.parametrize(("cls", "projector", "kwargs", "name"), [
    (lro.GUM, "svd", {"full_rank_layers": 2}, "full_rank_layers"),
    (lro.GUM, "svd", {"weighting": "after"}, "weighting"),
    (lro.GaLorePlus, "svd", {"oversample": 4}, "oversample"), (lro.GaLorePlus, "rsvd", {"num_heads": 2}, "num_heads"),
    (lro.OnlineSubspaceDescent, "rsvd", {"p_lr": 0.1}, "p_lr")])
def test_preset_options_for_another_projector_refused(cls: type, projector: str, kwargs: dict, name: str) -> None:
    """A preset's options of its own projector were dropped silently (GUM's branch options with projector="svd")
    or crashed inside the other projector (GaLore+'s oversample into "svd"); now: at their defaults they are not
    passed, set they are refused by name, as APOLLO's, COAP's and DCT-AdamW's are."""
    w = torch.nn.Parameter(torch.randn(8, 6))
    cls([{"params": [w], "rank": 2}], projector=projector)
    with pytest.raises(ValueError, match=rf"Invalid {name}: .* applies to projector="):
        cls([{"params": [w], "rank": 2}], projector=projector, **kwargs)


def test_loading_another_methods_state_dict_warns() -> None:
    """torch semantics: a state dict's hyper-parameters win on load. A GaLoreAdamW loading a GUM checkpoint then
    ran GUM (an 8-bit optimizer loading an fp32 one stored fp32) without a word; now a MethodDefaultWarning names
    each method key that changes. Loading the optimizer's own kind of checkpoint says nothing."""
    import warnings

    from lowrank_optim.groups import MethodDefaultWarning

    w = torch.nn.Parameter(torch.randn(8, 6))
    src = lro.GUM([{"params": [w], "rank": 2}])
    w.grad = torch.randn(8, 6)
    src.step()
    dst = lro.GaLoreAdamW([{"params": [w], "rank": 2}], state_dtype="8bit")
    with pytest.warns(MethodDefaultWarning, match=r"inner='adam' -> 'muon'.*state_dtype='8bit' -> 'fp32'"):
        dst.load_state_dict(src.state_dict())
    same = lro.GUM([{"params": [w], "rank": 2}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", MethodDefaultWarning)
        same.load_state_dict(src.state_dict())
