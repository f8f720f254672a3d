"""Smoke tests of the benchmark scripts on tiny configurations (schema, coverage, closed form == measured)."""

from __future__ import annotations

import ctypes.util
import dataclasses
import json
import math
import sys

import pytest
import torch

import lowrank_optim as lro
from benchmarks import common, convergence, frontier, malloc, memory, projectors, quick, sweep, throughput
from benchmarks.data import load_corpus
from benchmarks.model import DecoderConfig, build_model
from benchmarks.registry import OVERRIDES, specs
from lowrank_optim.memory import LLAMA_CONFIGS, count_state_bytes, estimate_state_bytes, llama_shapes
from lowrank_optim.projectors import PROJECTORS

TINY = llama_shapes(n_layers=1, d_model=64, d_ffn=160, vocab=96)
RECORD_KEYS = {"optimizer", "impl", "state_dtype", "label", "lr"}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch):
    """No progress bars; one thread (tiny tensors: thread start-up dominates and 2 cores are shared)."""
    monkeypatch.setenv("LRO_BENCH_QUIET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _labels(records: list[dict]) -> set[str]:
    return {r["label"] for r in records}


def _expected_labels(stores: tuple[str, ...]) -> set[str]:
    return {f"{n}[{s}]" for n in lro.available_optimizers() for s in stores} | {"torch:adamw"}


def test_registry_covers_every_registered_optimizer_and_store() -> None:
    labels = {s.label for s in specs()}
    assert _expected_labels(("fp32", "bf16", "8bit")) <= labels
    assert "galore_torch:galore_adamw" in labels and "bitsandbytes:adamw8bit" in labels
    assert len(labels) == len(specs())  # labels are unique
    assert set(OVERRIDES) <= set(lro.available_optimizers())  # no stale override entries


def test_llama_shapes_parameter_counts() -> None:
    # 60M config: two 32000x512 tables, 8 x (4 d^2 + 3 d ffn + 2 d) and the final norm.
    n = sum(torch.Size(s).numel() for s in llama_shapes(8, 512, 1376).values())
    assert n == 2 * 32000 * 512 + 8 * (4 * 512 * 512 + 3 * 512 * 1376 + 2 * 512) + 512 == 58_073_600
    assert "lm_head.weight" not in llama_shapes(1, 8, 16, tie_embeddings=True)


@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
def test_galore_estimate_is_the_closed_form(state_dtype: str) -> None:
    # one 512x64 weight, rank 16: basis 64x16 fp32 + two 512x16 moments; one 64-vector plain (two fp32 moments)
    shapes = {"attn.weight": (512, 64), "norm.weight": (64,)}
    est = estimate_state_bytes(shapes, "galore_adamw", rank=16, state_dtype=state_dtype)
    per_moment = {"fp32": 4 * 8192, "bf16": 2 * 8192, "8bit": 8192 + 4 * 32}[state_dtype]
    plain = 2 * 64 * (2 if state_dtype == "bf16" else 4)  # 64 < 4096 elements: 8-bit keeps fp32
    assert est.projector == 64 * 16 * 4
    assert est.total == 64 * 16 * 4 + 2 * per_moment + plain
    assert est.lowrank == ["attn.weight"]


@pytest.mark.parametrize("spec", specs(), ids=lambda s: s.label)
def test_closed_form_equals_measured(spec) -> None:
    est = memory.closed_form(spec, TINY, rank=16)
    real = common.synthetic_params(TINY, torch.device("cpu"))
    opt = spec.build(common.split_groups(real, 16, 200))
    opt.step()
    assert count_state_bytes(opt) == est["closed_form_bytes"]
    if hasattr(opt, "state_bytes"):  # our optimizers count themselves the same way
        assert opt.state_bytes() == est["closed_form_bytes"]


def test_estimate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="named_shapes"):
        estimate_state_bytes({}, "galore_adamw")
    with pytest.raises(ValueError, match="target_modules"):
        estimate_state_bytes({"x.weight": (4, 4)}, "galore_adamw", target_modules=["attn"])
    with pytest.raises(ValueError, match="name"):
        estimate_state_bytes(TINY, "no_such_optimizer")


def test_memory_run_schema_and_ratio(tmp_path) -> None:
    res = memory.run(["tiny"], ["tiny"], ("8bit",), shapes_override={"tiny": TINY})
    recs = res["records"]
    assert _expected_labels(("8bit",)) <= _labels(recs)
    for r in recs:
        assert set(r) >= RECORD_KEYS and r["closed_equals_measured"] is True
    adam = next(r for r in recs if r["label"] == "torch:adamw")
    assert adam["ratio_to_adamw"] == 1.0
    assert adam["closed_form_bytes"] == sum(2 * 4 * torch.Size(s).numel() + 4 for s in TINY.values())
    path = common.write_json(tmp_path, "memory", "cpu", True, {"x": 1}, recs)
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "memory" and payload["records"][0]["optimizer"] == "adamw"
    memory.plot(res, tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
    assert "torch:adamw" in memory.summary(res)


def test_paper_table_rows() -> None:
    rows = memory.paper_table(["60M"])
    adam = next(r for r in rows if r["method"] == "Adam")
    assert adam["params"] == 58_073_600
    assert adam["ours_GB"] == pytest.approx(6 * 58_073_600 / 1e9)  # 2 bytes weights + 2 x 2 bytes moments


def test_throughput_run_schema(tmp_path) -> None:
    recs = throughput.run("tiny", steps=2, refresh_steps=1, state_dtypes=("fp32",), shapes=TINY, rank=16)
    assert _expected_labels(("fp32",)) <= _labels(recs)
    for r in recs:
        assert "error" not in r, r
        assert set(r) >= RECORD_KEYS and r["median_step_s"] > 0 and r["p95_step_s"] >= r["median_step_s"] * 0.999
        assert (r["refresh_step_s"] is None) == (r["impl"] in ("torch", "bitsandbytes"))
        if r["refresh_step_s"] is not None:
            expected = (r["median_step_s"] * 199 + r["refresh_step_s"]) / 200
            assert r["amortized_step_s"] == pytest.approx(expected)
        # on the CPU every ratio divides by the AdamW steps paired with this optimizer's own steps (fused AdamW's too)
        if r["label"] == "torch:adamw":
            assert "paired_adamw_median_step_s" not in r and r["amortized_ratio_to_adamw"] == 1.0
        else:
            assert r["amortized_ratio_to_adamw"] == pytest.approx(r["amortized_step_s"]
                                                                  / r["paired_adamw_median_step_s"])
    # fused AdamW is timed beside the default one; every ratio is also given against it
    fused = next(r for r in recs if r["label"] == "torch:adamw(fused)")
    assert fused["kwargs"] == {"weight_decay": 0.0, "fused": True}
    assert fused["amortized_ratio_to_fused_adamw"] == 1.0
    for r in recs:
        assert r["amortized_ratio_to_fused_adamw"] == pytest.approx(r["amortized_ratio_to_adamw"]
                                                                    / fused["median_ratio_to_adamw"])
    throughput.plot(recs, tmp_path / "t.png", "t")
    assert "amortized" in throughput.summary(recs) and "paired AdamW ms" in throughput.summary(recs)
    assert "amortized /fused AdamW" in throughput.summary(recs)
    # GaLore+'s one-off residual warm-up is timed apart and the steady steps start after it
    warm = {r["label"]: r["warmup_steps"] for r in recs}
    assert warm["galore_plus[fp32]"] == 10 and warm["galore_adamw[fp32]"] == 0, warm


def test_warmup_steps_are_galore_plus_residual_warmup() -> None:
    p = [torch.nn.Parameter(torch.zeros(8, 8))]
    assert throughput.warmup_steps(lro.GaLorePlus([{"params": p, "rank": 2}], residual_warmup=4)) == 4
    assert throughput.warmup_steps(lro.GaLorePlus([{"params": p, "rank": 2}], residual_density=0.0)) == 0
    assert throughput.warmup_steps(lro.GaLoreAdamW([{"params": p, "rank": 2}])) == 0


def test_convergence_run_schema(tmp_path) -> None:
    cfg = DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ffn=64, max_len=16)
    recs = convergence.run(cfg, steps=3, batch_size=2, seq_len=16, rank=8, update_proj_gap=2, eval_every=3,
                           eval_batches=1, state_dtypes=("fp32",))
    assert _expected_labels(("fp32",)) <= _labels(recs)
    for r in recs:
        assert "error" not in r, r
        assert set(r) >= RECORD_KEYS and len(r["train_curve"]) == 3 and r["state_bytes"] > 0
    adam = next(r for r in recs if r["label"] == "torch:adamw")
    assert math.isfinite(adam["val_loss"]) and adam["val_loss_minus_adamw"] == 0.0
    convergence.plot(recs, tmp_path / "c.png", "c")
    assert "val loss" in convergence.summary(recs)


def test_projectors_run_covers_every_projector() -> None:
    recs = projectors.run(["tiny"], shapes={"tiny": (48, 32, 8)})
    assert {r["projector"] for r in recs} == set(PROJECTORS)
    svd = next(r for r in recs if r["projector"] == "svd" and r["matrix"] == "decaying_spectrum")
    assert svd["fraction_of_optimal"] == pytest.approx(1.0, abs=1e-4)  # Eckart-Young: exact SVD is optimal
    for r in recs:
        if "captured" in r:
            assert -1e-6 <= r["captured"] <= 1 + 1e-4
    assert "projector" in projectors.summary(recs)


def test_lr_schedule_and_data_are_deterministic() -> None:
    assert convergence.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert convergence.lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert convergence.lr_factor(100, 100, 10) == pytest.approx(0.1)
    a, b = load_corpus(source_bytes=20_000), load_corpus(source_bytes=20_000)
    assert a.sha256 == b.sha256 and a.train.numel() + a.val.numel() == a.n_bytes
    x1, y1 = a.batch("train", 3, 2, 8)
    x2, _ = b.batch("train", 3, 2, 8)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])


def test_decoder_is_causal() -> None:
    model = build_model(DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ffn=64, max_len=16))
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 256
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :8], model(y)[0, :8], atol=1e-6)
        assert not torch.allclose(model(x)[0, 8:], model(y)[0, 8:])
    names = [n for n, _ in model.named_modules()]
    assert any("attn" in n for n in names) and any("mlp" in n for n in names)


def test_quick_plot_names() -> None:
    assert quick.plot_name("throughput", "cuda") == "throughput_cuda.png"
    assert quick.plot_name("projectors", "cuda") == "projectors.png"


def test_count_state_bytes_counts_views_by_storage_once() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1)
    full = torch.zeros(10, 10)
    opt.state[p] = {"basis": full[:2], "again": full[5:], "own": torch.zeros(3, dtype=torch.bfloat16)}
    assert count_state_bytes(opt) == 10 * 10 * 4 + 3 * 2  # a slice keeps its whole storage alive
    meta = torch.zeros(10, 10, device="meta")
    opt.state[p] = {"basis": meta[:2], "again": meta[5:]}
    assert count_state_bytes(opt) == 400


def test_quick_refresh_uses_first_step_and_custom_corpus(tmp_path) -> None:
    recs = throughput.run("tiny", steps=1, refresh_steps=0, state_dtypes=("fp32",), references=False,
                          only=["galore_adamw"], shapes=TINY, rank=16)
    ours = next(r for r in recs if r["label"] == "galore_adamw[fp32]")
    assert ours["refresh_source"] == "first_step" and ours["refresh_step_s"] == ours["first_step_s"]
    path = tmp_path / "text.txt"
    path.write_text("hello world, " * 1000)
    corpus = load_corpus(path, val_fraction=0.25)
    assert corpus.n_bytes == 13_000 and corpus.val.numel() == 3250 and corpus.source == str(path)
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(path, val_fraction=1.0)


def test_malloc_pinning_is_recorded(monkeypatch) -> None:
    """On glibc the benchmarks pin malloc's thresholds (``mallopt`` succeeds) and every result records it."""
    monkeypatch.setitem(malloc._state, "pinned", False)
    assert "defaults" in common.environment("cpu")["malloc"]
    args = common.parser("x").parse_args(["--dynamic-malloc"])
    common.setup(args)
    assert not malloc._state["pinned"]
    if ctypes.util.find_library("c") is None or not sys.platform.startswith("linux"):
        pytest.skip("not glibc")
    common.setup(common.parser("x").parse_args([]))
    assert malloc._state["pinned"] and "pinned at 128 KiB" in common.environment("cpu")["malloc"]


# -- end-to-end mode and allocator regimes (issue 12) ------------------------------------------------------------
E2E_TINY = DecoderConfig(vocab=96, d_model=32, n_layers=1, n_heads=2, d_ffn=64, max_len=32)


def test_throughput_e2e_schema_and_ratios() -> None:
    recs = throughput.run_e2e("tiny", steps=2, only=["galore_adamw"], rank=8, batch_size=2, seq_len=16,
                              cfg=E2E_TINY)
    assert [r["label"] for r in recs] == ["torch:adamw", "galore_adamw[fp32]"]
    for r in recs:
        assert "error" not in r, r
        assert r["mode"] == "e2e" and r["malloc"] in ("warm", "pinned", "dynamic") and r["tokens_per_step"] == 32
        assert r["tokens_per_s"] == pytest.approx(32 / r["median_step_s"])
        assert r["adamw_tokens_per_s"] == pytest.approx(32 / r.get("paired_adamw_median_step_s", r["median_step_s"]))
        assert r["tokens_per_s_ratio_to_adamw"] == pytest.approx(r["tokens_per_s"] / r["adamw_tokens_per_s"])
        assert r["minor_faults_per_step"] >= 0 and r["state_bytes"] > 0
    adamw, galore = recs
    assert adamw["tokens_per_s_ratio_to_adamw"] == 1.0 and adamw["amortized_step_s"] == adamw["median_step_s"]
    assert galore["amortized_step_s"] == pytest.approx((galore["median_step_s"] * 199 + galore["first_step_s"]) / 200)
    assert galore["state_bytes"] < adamw["state_bytes"]
    with pytest.raises(ValueError, match="seq_len"):
        throughput.run_e2e("tiny", steps=1, only=["galore_adamw"], seq_len=64, cfg=E2E_TINY)


def test_throughput_summary_reports_each_regime_headline_first() -> None:
    def rec(label: str, regime: str, mode: str, ratio: float) -> dict:
        base = {"label": label, "mode": mode, "malloc": regime, "median_step_s": 0.1, "refresh_step_s": None,
                "amortized_ratio_to_adamw": ratio, "minor_faults_per_step": 0}
        if mode == "e2e":
            base.update({"tokens_per_s": 100.0, "tokens_per_s_ratio_to_adamw": ratio,
                         "amortized_tokens_per_s_ratio_to_adamw": ratio})
        return base

    recs = [rec(lab, g, m, x) for g in ("warm", "pinned") for m in ("step", "e2e")
            for lab, x in (("torch:adamw", 1.0), ("galore_adamw[fp32]", 0.5 if g == "warm" else 0.75))]
    table = throughput.summary(recs)
    step, e2e = table.split("\n\n")
    header = step.splitlines()[0]
    assert header.index("amortized /AdamW (warm)") < header.index("amortized /AdamW (pinned)")
    assert "| galore_adamw[fp32] | 100 | 0.5 | 0 | 100 | 0.75 | 0 |" in step  # empty columns left out
    assert e2e.splitlines()[0].startswith("| optimizer (end-to-end) | tok/s (warm) | /AdamW (warm)")


def test_malloc_regime_environments() -> None:
    env = malloc.warm_env({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1:glibc.cpu.x86_ibt=off", "A": "1"})
    assert env["GLIBC_TUNABLES"] == f"glibc.cpu.x86_ibt=off:{malloc.WARM_HEAP_TUNABLES}" and env["A"] == "1"
    assert malloc.is_warm(env) and not malloc.is_warm({"A": "1"})
    assert malloc.cold_env(env)["GLIBC_TUNABLES"] == "glibc.cpu.x86_ibt=off"
    assert "GLIBC_TUNABLES" not in malloc.cold_env(malloc.warm_env({}))
    assert throughput._child_argv(["--quick", "--regimes", "warm,pinned", "--records-json=x"], "warm",
                                  "/t/w.json") == ["--quick", "--regimes", "warm", "--records-json", "/t/w.json"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="glibc")
def test_warm_regime_runs_in_a_child_process_with_the_tunables() -> None:
    """The warm heap needs GLIBC_TUNABLES at process start: the child reports the regime it really ran in."""
    records, envs = throughput.run_regimes(["--size", "tiny", "--mode", "e2e", "--steps", "1", "--only",
                                            "galore_adamw", "--no-references", "--batch-size", "1",
                                            "--seq-len", "8"], ["warm"])
    assert envs["warm"]["malloc_regime"] == "warm" and "GLIBC_TUNABLES" in envs["warm"]["malloc"]
    assert {r["malloc"] for r in records} == {"warm"} and {r["label"] for r in records} == {
        "torch:adamw", "galore_adamw[fp32]"}


def test_gpu_check_cpu_part(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU check's code paths on the CPU with tiny shapes (the CUDA run: ``python -m benchmarks.gpu_check``)."""
    from benchmarks import gpu_check

    result = gpu_check.main(["--device", "cpu", "--tiny", "--only", "galore_adamw,fira", "--out", str(tmp_path)])
    assert [r["label"] for r in result["matrix"]] == [f"{n}[{s}]" for n in ("fira", "galore_adamw")
                                                      for s in ("fp32", "bf16", "8bit")]
    assert all(r["status"] == "ok" and r["state_bytes"] > 0 for r in result["matrix"]), result["matrix"]
    # on the CPU both "devices" are the CPU: the same seeds must give bit-identical trajectories
    assert [(r["label"], r["status"], r["max_rel_diff"]) for r in result["trajectories"]] == [
        ("fira[fp32]", "ok", 0.0), ("galore_adamw[fp32]", "ok", 0.0)]
    # the rounding sensitivity is measured (a perturbed run that moved nothing would make the bound vacuous)
    assert all(0 < r["rounding_sensitivity"] < 1e-2 and r["bound"] >= 1e-3 for r in result["trajectories"])
    speed = {r["label"]: r for r in result["speed"]}
    assert {"torch:adamw(fused)", "galore_adamw[fp32]", "galore_adamw[8bit]", "fira[fp32]",
            "galore_adamw[fp32,tf32]"} <= set(speed)
    assert speed["galore_adamw[fp32,tf32]"]["matmul_precision"] == "high"  # the case's own setting, then restored
    assert speed["galore_adamw[fp32]"]["matmul_precision"] == "highest" == torch.get_float32_matmul_precision()
    assert speed["torch:adamw(fused)"]["tokens_per_s_ratio_to_adamw"] == 1.0
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in result["speed"]), result["speed"]
    assert speed["galore_adamw[fp32]"]["state_bytes"] < speed["torch:adamw(fused)"]["state_bytes"]
    assert {r["label"] for r in result["refresh"]} >= {"linalg.svd", "eigh(G G^T) fp64", "projector svd.init"}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in result["refresh"]), result["refresh"]
    assert [r["label"] for r in result["profile"]] == ["torch:adamw(fused)", "galore_adamw[fp32]",
                                                       "galore_adamw[8bit]", "fira[fp32]", "galore_adamw[fp32] tf32"]
    assert all(r["status"] == "ok" and r["top_ops"] for r in result["profile"]), result["profile"]
    # the fused codecs run on CUDA only: skipped by name on the CPU, their state recorded after every part
    assert [r["status"][:8] for r in result["codecs"]] == ["skipped:"], result["codecs"]
    assert result["fused_codecs"]["after_speed"]["broken"] is None
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["anchor"]["galore_8bit"] == {"tokens_per_s": 1109, "memory_GB": 7.95}
    assert "anchor, GaLore paper" in gpu_check.summary(result)
    # without bitsandbytes the 8-bit cases are skipped, not failed
    monkeypatch.setattr(gpu_check, "_have_bnb", lambda: False)
    matrix = gpu_check.check_matrix(torch.device("cpu"), gpu_check.SETTINGS["tiny"]["matrix_shapes"], 8, 1,
                                    only=["galore_adamw"])
    assert [r["status"][:7] for r in matrix] == ["ok", "ok", "skipped"]


def test_gpu_check_budget_and_cpu_draws(tmp_path) -> None:
    """A spent budget skips cases by name (and still writes the JSON); seeded random projectors are switched to
    CPU draws before the first step, so CPU and CUDA trajectories use the same bases."""
    from benchmarks import gpu_check
    from benchmarks.registry import specs

    result = gpu_check.run("cpu", tiny=True, only=["flora"], budget_s=0.0, out_path=tmp_path / "g.json")
    saved = json.loads((tmp_path / "g.json").read_text())
    for part in ("matrix", "trajectories"):
        assert {r["status"] for r in result[part]} == {"skipped: time budget"}, result[part]
        assert saved[part] == result[part]
    assert {r["status"] for r in result["speed"] if r["label"] != "bitsandbytes:adamw8bit"} == {
        "skipped: time budget"}
    flora = next(s for s in specs(("fp32",), references=False, only=["flora"]) if s.impl == "lowrank_optim")
    params = gpu_check._params(gpu_check.SETTINGS["tiny"]["matrix_shapes"], torch.device("cpu"))
    opt = flora.build(gpu_check.common.split_groups(params, 8, 2))
    gpu_check._cpu_draws(opt)
    drawn = [opt._parts(g).projector for g in opt.param_groups if g.get("rank") is not None]
    assert drawn and all(p.generator == "cpu" for p in drawn)
    # the speed part runs GaLore first after the baselines, SVD-heavy presets last
    order = [label for label, _, _ in gpu_check._speed_specs(False)]
    assert order[:4] == ["torch:adamw(fused)", "galore_adamw[fp32]", "galore_adamw[fp32,tf32]", "flora[fp32]"]
    assert order[-1] == "galore_plus[fp32]"


# -- tuned comparison (benchmarks.sweep) and the frontier ----------------------------------------------------
TINY_SWEEP = sweep.SweepConfig(cfg=DecoderConfig(d_model=32, n_layers=1, n_heads=2, d_ffn=64, max_len=16), steps=3,
                               batch_size=2, seq_len=16, rank=4, update_proj_gap=2, eval_batches=1, seeds=3,
                               grid=(1e-3, 10**-2.5, 1e-2, 10**-1.5), max_extensions=3,
                               state_dtypes=("fp32", "8bit"))


def _fake_executor(optimum: dict[str, float], calls: list[sweep.Task], diverge_above: float = math.inf):
    """Runs no training: the selection loss is (log10 lr - log10 optimum)^2 (+ 0.01 * seed), NaN above
    ``diverge_above``; every task it is given is appended to ``calls``."""

    def execute(tasks):
        for t in tasks:
            calls.append(t)
            opt_name = t.label.split("[")[0].split(":")[-1]
            loss = (math.log10(t.lr) - math.log10(optimum.get(opt_name, 1e-2))) ** 2 + 0.01 * t.seed
            if t.lr > diverge_above:
                loss = math.nan
            yield {"label": t.label, "optimizer": opt_name, "impl": "x", "state_dtype": "fp32", "lr": t.lr,
                   "seed": t.seed, "val_loss": loss, "heldout_loss": loss + 0.5, "diverged": not math.isfinite(loss),
                   "wall_s": 0.0, "state_bytes": 1}

    return execute


def _rows(result: dict) -> dict[str, dict]:
    return {r["label"]: r for r in result["rows"]}


def test_sweep_extends_an_edge_until_the_best_lr_is_interior(tmp_path) -> None:
    calls: list[sweep.Task] = []
    # AdamW's optimum 0.1 lies beyond the grid's top (3.16e-2): two extensions (0.1, 0.316) make it interior.
    # galore_adamw's optimum 1e-6 lies 3 half-decades below the grid's floor plus more: 3 extensions, still edge.
    result = sweep.run_sweep(TINY_SWEEP, tmp_path / "runs.jsonl", only=["galore_adamw"], references=False,
                             executor=_fake_executor({"adamw": 0.1, "galore_adamw": 1e-6}, calls),
                             log=lambda s: None)
    rows = _rows(result)
    adamw = rows["torch:adamw"]
    assert [p["lr"] for p in adamw["tried"]] == pytest.approx([1e-3, 10**-2.5, 1e-2, 10**-1.5, 0.1, 10**-0.5],
                                                              rel=1e-5)
    assert adamw["best_lr"] == pytest.approx(0.1) and not adamw["at_edge"] and adamw["extensions"] == 2
    assert adamw["grid"] == list(TINY_SWEEP.grid)
    low = rows["galore_adamw[fp32]"]
    assert low["extensions"] == 3 and low["at_edge"] and low["best_lr"] == pytest.approx(10**-4.5, rel=1e-5)
    assert not result["complete"]  # an lr still on its grid's edge is not a finished comparison
    # seeds 1..2 at the best lr; the 8-bit store runs at the fp32 spec's best lr on every seed
    assert adamw["seeds_done"] == 3 and adamw["heldout"]["mean"] == pytest.approx(0.5 + 0.01)
    assert adamw["heldout"]["std"] == pytest.approx(0.01) and adamw["heldout_minus_adamw"] == 0.0
    store = rows["galore_adamw[8bit]"]
    assert store["tuned_on"] == "galore_adamw[fp32]" and store["best_lr"] == low["best_lr"]
    assert sorted(t.seed for t in calls if t.label == "galore_adamw[8bit]") == [0, 1, 2]
    assert len({t.key() for t in calls}) == len(calls)  # no run twice
    # resume: every run is in the file, so nothing runs again and the summary is the same
    again: list[sweep.Task] = []
    result2 = sweep.run_sweep(TINY_SWEEP, tmp_path / "runs.jsonl", only=["galore_adamw"], references=False,
                              executor=_fake_executor({}, again), log=lambda s: None)
    assert again == [] and result2["rows"] == result["rows"]


def test_sweep_counts_a_diverged_run_as_worst(tmp_path) -> None:
    calls: list[sweep.Task] = []
    # optimum above the grid, but everything above 0.02 diverges: the best is 1e-2, interior, no extension
    result = sweep.run_sweep(dataclasses.replace(TINY_SWEEP, state_dtypes=("fp32",)), tmp_path / "r.jsonl",
                             only=["galore_adamw"], references=False,
                             executor=_fake_executor({"adamw": 1.0, "galore_adamw": 1.0}, calls, diverge_above=0.02),
                             log=lambda s: None)
    row = _rows(result)["torch:adamw"]
    assert row["best_lr"] == pytest.approx(1e-2) and not row["at_edge"] and row["extensions"] == 0
    assert row["tried"][-1]["val_loss"] is None and row["tried"][-1]["diverged"]
    assert result["complete"]


def test_sweep_real_runs_schema_and_frontier(tmp_path) -> None:
    """Two real (3-step) trainings per spec through the worker path; the JSON, plots and frontier from them."""
    conf = dataclasses.replace(TINY_SWEEP, grid=(1e-3, 1e-2), max_extensions=0, seeds=2, state_dtypes=("fp32",))
    labels = [s.label for s in specs(conf.state_dtypes, controls=True)]
    sweep._init_worker(conf, None, labels)
    result = sweep.run_sweep(conf, tmp_path / "r.jsonl", only=["galore_adamw"], references=False,
                             executor=lambda tasks: [sweep._run_task(t) for t in tasks], log=lambda s: None)
    rows = _rows(result)
    assert set(rows) == {"torch:adamw", "torch:adamw_blocks_x0.25", "galore_adamw[fp32]"}
    for r in rows.values():
        assert r["seeds_done"] == 2 and not r["errors"] and math.isfinite(r["heldout"]["mean"])
        assert r["documented_lr"] == 1e-3 and r["state_bytes_toy"] > 0
    sweep.plot(result, tmp_path / "s.png", "s")
    assert "held-out loss" in sweep.summary(result)
    payload = {"records": result["rows"], "config": conf.asdict()}
    recs = frontier.build(payload, {"torch:adamw": 100, "torch:adamw_blocks_x0.25": 100, "galore_adamw[fp32]": 40})
    assert {r["label"] for r in recs} == set(rows)
    frontier.plot(recs, tmp_path / "f.png", "f")
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_pareto_front() -> None:
    pts = [(10.0, 1.0), (5.0, 2.0), (5.0, 3.0), (1.0, 5.0), (20.0, 1.0), (3.0, 2.0)]
    # (5, 2) loses to (3, 2); (5, 3) to (3, 2); (20, 1) to (10, 1)
    assert frontier.pareto_front(pts) == [3, 5, 0]


def test_frontier_bytes_are_the_closed_form_at_1b() -> None:
    """torch AdamW at LLaMA-1B shapes: two fp32 moments per weight and one fp32 step counter per tensor."""
    shapes = llama_shapes(**LLAMA_CONFIGS["1B"])
    n = sum(torch.Size(s).numel() for s in shapes.values())
    got = frontier.state_bytes_at(["torch:adamw"])
    assert got == {"torch:adamw": 8 * n + 4 * len(shapes)}


@pytest.mark.parametrize("stagger", [False, True])
def test_stagger_period_refreshes_every_matrix_once(stagger: bool) -> None:
    """benchmarks.stagger times one full period: every projected matrix refreshes exactly once in it, all at one
    step without staggering, at most ceil(count / gap) per step with it."""
    from benchmarks import stagger as bench

    gap = 5
    rec = bench.period_times(stagger, "tiny", rank=8, gap=gap)
    count = 7  # one decoder layer: q, k, v, o, gate, up, down
    assert len(rec["step_s"]) == gap and sum(rec["refreshes_per_step"]) == count
    assert max(rec["refreshes_per_step"]) == (math.ceil(count / gap) if stagger else count)


def test_variants_run_only_when_named() -> None:
    """``--only gum+ns_bf16`` adds GUM with bf16 Newton-Schulz (record name and kwargs say so); no default run does."""
    from benchmarks.registry import VARIANTS, specs

    assert not {s.optimizer for s in specs(("fp32",), False)} & set(VARIANTS)
    (spec,) = [s for s in specs(("fp32",), False, ["gum+ns_bf16"]) if s.optimizer == "gum+ns_bf16"]
    assert spec.label == "gum+ns_bf16[fp32]" and spec.kwargs == {"ns_dtype": "bf16"}
    w = torch.nn.Parameter(torch.randn(8, 6))
    opt = spec.build([{"params": [w], "rank": 2, "update_proj_gap": 5}])
    assert type(opt).__name__ == "GUM" and opt.param_groups[0]["ns_dtype"] == "bf16"


def test_repeats_combine_medians_runs_and_errors() -> None:
    from benchmarks import repeats

    def rec(label: str, ratio: float, ms: float, **kw: object) -> dict:
        return {"label": label, "mode": "step", "malloc": "warm", "amortized_ratio_to_adamw": ratio,
                "median_step_s": ms, "refresh_step_s": None, "impl": "lowrank_optim", "lowrank": True, **kw}

    runs = [[rec("a", 1.30, 0.20), rec("b", 0.9, 0.1)],
            [rec("a", 1.20, 0.30), rec("b", 0.8, 0.2, error="E: x")],
            [rec("a", 1.40, 0.10), rec("b", 1.0, 0.3)]]
    out = repeats.combine(runs)
    assert [r["label"] for r in out] == ["a", "b"]
    a, b = out
    assert a["amortized_ratio_to_adamw"] == 1.30 and a["median_step_s"] == 0.20  # medians, field by field
    assert a["runs"]["amortized_ratio_to_adamw"] == [1.30, 1.20, 1.40] and a["repeats"] == 3
    assert a["lowrank"] is True and a["impl"] == "lowrank_optim"  # bools and strings: the first run's
    assert b["error"] == "E: x" and b["amortized_ratio_to_adamw"] == 0.9
    assert repeats.spread(a, "amortized_ratio_to_adamw") == "1.200-1.400"
    assert repeats.spread(runs[0][0], "amortized_ratio_to_adamw") is None
    even = repeats.combine(runs[:2])
    assert even[0]["amortized_ratio_to_adamw"] == 1.25  # the mean of the middle two
    assert repeats.combine(runs[:1]) == runs[0]
    with pytest.raises(ValueError, match="two records"):
        repeats.combine([[rec("a", 1, 1), rec("a", 2, 2)], [rec("a", 1, 1)]])
    with pytest.raises(ValueError, match="at least one"):
        repeats.combine([])
    assert "range over runs (warm)" in throughput.summary(out)


def test_repeats_run_child_processes_and_combine() -> None:
    from pathlib import Path

    assert throughput._child_argv(["--repeats", "3", "--quick", "--repeats=2"], "warm", Path("r.json")) == [
        "--quick", "--regimes", "warm", "--records-json", "r.json"]
    records, _ = throughput.run_regimes(["--size", "tiny", "--mode", "e2e", "--steps", "1", "--only",
                                         "galore_adamw", "--no-references"], ["pinned"], repeats=2)
    assert records and all(r["repeats"] == 2 and len(r["runs"]["median_step_s"]) == 2 for r in records)
    with pytest.raises(SystemExit, match="repeats"):
        throughput.main(["--repeats", "0", "--size", "tiny"])
