"""Tuned comparison: every optimizer's lr searched on one grid, chosen on validation, re-run on seeds.

``python -m benchmarks.convergence --sweep`` runs, for every fp32 spec of :func:`benchmarks.registry.specs`
(our presets and the references, torch AdamW included):

1. the shared lr grid :data:`GRID` (half-decade steps, 1e-3 to 3.16e-2: it holds the constructors' default
   1e-3 and the papers' pre-training 1e-2), seed 0;
2. edge extension: while the best lr (lowest validation loss on the *selection* batches) is the smallest or
   largest point tried, one more point half a decade beyond that edge is run, at most
   :data:`MAX_EXTENSIONS` times; a best lr still on the edge after that is flagged ``at_edge`` in the results.
   A diverged run counts as an infinite loss;
3. the best lr re-run on seeds ``1 .. seeds-1`` (the seed sets the initial weights and the order of the
   training batches); mean, standard deviation, min and max of the *held-out* validation loss over the seeds;
4. every other state store of our presets (bf16, 8-bit) at its fp32 spec's best lr, on every seed (the lr
   is tuned once per method, on fp32; the store is a storage choice, not a new method).

Validation: the last 10% of the corpus. Selection uses validation batches ``0 .. eval_batches-1``; the
reported loss uses batches ``eval_batches .. 2*eval_batches-1`` of the same split, which the selection never
saw. Only the end of training is compared (no curve is read).

Runs go to ``<out>/<name>_runs.jsonl`` one line at a time, so an interrupted sweep resumes where it stopped
(``--resume``) and a partial sweep can still be summarised. Runs execute in ``jobs`` worker processes with
one torch thread each.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowrank_optim import param_groups
from lowrank_optim.memory import count_state_bytes

from .data import Corpus, load_corpus
from .model import DecoderConfig, build_model
from .registry import Spec, specs

#: Shared starting grid (every spec): half-decade points from 1e-3 to 3.16e-2.
GRID: tuple[float, ...] = (1e-3, 10 ** -2.5, 1e-2, 10 ** -1.5)
#: Multiplicative distance of an extension point from the current edge (half a decade).
STEP = 10**0.5
MAX_EXTENSIONS = 3


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep trains: model, data, schedule, grid and seeds."""

    cfg: DecoderConfig
    steps: int
    batch_size: int
    seq_len: int
    rank: int
    update_proj_gap: int
    eval_batches: int
    seeds: int = 3
    grid: tuple[float, ...] = GRID
    max_extensions: int = MAX_EXTENSIONS
    state_dtypes: tuple[str, ...] = ("fp32", "bf16", "8bit")

    @property
    def tokens(self) -> int:
        """Training tokens (bytes) per run."""
        return self.steps * self.batch_size * self.seq_len

    def asdict(self) -> dict[str, Any]:
        return {"model": self.cfg.asdict(), "steps": self.steps, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "tokens_per_run": self.tokens, "rank": self.rank,
                "update_proj_gap": self.update_proj_gap, "eval_batches": self.eval_batches, "seeds": self.seeds,
                "grid": list(self.grid), "extension_factor": STEP, "max_extensions": self.max_extensions,
                "state_dtypes": list(self.state_dtypes),
                "schedule": "linear warm-up (10% of steps) + cosine to 10% of peak",
                "selection": f"val batches 0..{self.eval_batches - 1}, seed 0",
                "report": f"val batches {self.eval_batches}..{2 * self.eval_batches - 1}, mean over seeds"}


_MODEL = DecoderConfig(d_model=128, n_layers=2, n_heads=4, d_ffn=344, max_len=64)
#: The designed sweep (``--sweep-size full``): 200 steps x 1024 tokens per run, three state stores; about
#: 190 runs of ~16 s each (one thread), ~30 min with 2 jobs on an idle 2-core machine.
SWEEP = SweepConfig(cfg=_MODEL, steps=200, batch_size=16, seq_len=64, rank=32, update_proj_gap=50, eval_batches=8)
#: A quarter of the compute per run (100 steps x 512 tokens) and two stores (``--sweep-size small``): for a
#: busy machine; the same model, grid, selection and seeds.
SWEEP_SMALL = SweepConfig(cfg=_MODEL, steps=100, batch_size=8, seq_len=64, rank=32, update_proj_gap=25,
                          eval_batches=8, state_dtypes=("fp32", "8bit"))
SIZES = {"full": SWEEP, "small": SWEEP_SMALL}


@dataclass(frozen=True)
class Task:
    """One training run: a spec label at one lr and seed; ``priority`` orders the queue (0: lr search and
    the full-rank baselines' seeds, 1: other seeds at the best lr, 2: other state stores), so a sweep cut
    short has finished whole phases."""

    label: str
    lr: float
    seed: int
    priority: int = field(default=0, compare=False)

    def key(self) -> tuple[str, str, int]:
        return (self.label, f"{self.lr:.6g}", self.seed)


def lr_factor(step: int, total: int, warmup: int, final: float = 0.1) -> float:
    """Linear warm-up to 1, then cosine decay to ``final`` at ``total`` (step counts from 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, corpus: Corpus, first: int, count: int, batch_size: int,
              seq_len: int) -> float:
    """Mean loss over validation batches ``first .. first+count-1`` (fixed, the same for every run)."""
    model.eval()
    total = sum(float(model(*corpus.batch("val", i, batch_size, seq_len))) for i in range(first, first + count))
    model.train()
    return total / count


def train_run(spec: Spec, conf: SweepConfig, corpus: Corpus, lr: float, seed: int) -> dict[str, Any]:
    """Trains a fresh decoder with ``spec`` at peak ``lr``; returns the end-of-training record."""
    model = build_model(conf.cfg, seed=seed)
    groups = param_groups(model, rank=conf.rank, target_modules=["attn", "mlp"],
                          update_proj_gap=conf.update_proj_gap)
    opt = spec.build(groups, lr)
    base = [g["lr"] for g in opt.param_groups]
    warmup = max(1, conf.steps // 10)
    t0 = time.perf_counter()
    train_loss = float("nan")
    diverged = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(conf.steps):
            for g, peak in zip(opt.param_groups, base, strict=True):
                g["lr"] = peak * lr_factor(step, conf.steps, warmup)
            x, y = corpus.batch("train", step, conf.batch_size, conf.seq_len, seed=seed)
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            train_loss = float(loss)
            if not math.isfinite(train_loss):
                diverged = True
                break
    nan = float("nan")
    select = nan if diverged else mean_loss(model, corpus, 0, conf.eval_batches, conf.batch_size, conf.seq_len)
    held = nan if diverged else mean_loss(model, corpus, conf.eval_batches, conf.eval_batches, conf.batch_size,
                                          conf.seq_len)
    return {"val_loss": select, "heldout_loss": held, "final_train_loss": train_loss,
            "diverged": diverged or not math.isfinite(select), "wall_s": time.perf_counter() - t0,
            "state_bytes": count_state_bytes(opt)}


# -- worker processes ------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(conf: SweepConfig, corpus_path: str | None, labels: Sequence[str]) -> None:
    torch.set_num_threads(1)
    _WORKER["conf"] = conf
    _WORKER["corpus"] = load_corpus(corpus_path)
    _WORKER["specs"] = {s.label: s for s in specs(conf.state_dtypes, controls=True) if s.label in set(labels)}


def _run_task(task: Task) -> dict[str, Any]:
    spec: Spec = _WORKER["specs"][task.label]
    rec = {**spec.record(), "lr": task.lr, "seed": task.seed}
    try:
        rec.update(train_run(spec, _WORKER["conf"], _WORKER["corpus"], task.lr, task.seed))
    except Exception as err:  # a failing reference is reported, not fatal
        rec["error"] = f"{type(err).__name__}: {err}"[:300]
    return rec


# -- the search ------------------------------------------------------------------------------------
def _loss(rec: dict[str, Any] | None) -> float:
    v = None if rec is None else rec.get("val_loss")
    return v if isinstance(v, float) and math.isfinite(v) else math.inf


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


@dataclass
class LrSearch:
    """The lr search of one spec: points tried at seed 0, and the next point while the best is on an edge."""

    grid: tuple[float, ...]
    max_extensions: int
    results: dict[float, dict[str, Any]] = field(default_factory=dict)
    extensions: int = 0

    def best(self) -> float | None:
        """The lr with the lowest selection loss (the smaller lr on ties); None if every run failed."""
        done = sorted(self.results)
        finite = [lr for lr in done if math.isfinite(_loss(self.results[lr]))]
        return min(finite, key=lambda lr: (_loss(self.results[lr]), lr)) if finite else None

    def at_edge(self) -> bool:
        """Whether the best lr is the smallest or largest lr tried."""
        best = self.best()
        done = sorted(self.results)
        return best is not None and len(done) > 1 and best in (done[0], done[-1])

    def next_point(self) -> float | None:
        """The extension beyond the edge holding the best lr, or None when the search is finished."""
        if len(self.results) < len(self.grid) or not self.at_edge() or self.extensions >= self.max_extensions:
            return None
        done = sorted(self.results)
        best = self.best()
        return float(f"{done[0] / STEP if best == done[0] else done[-1] * STEP:.6g}")

    def summary(self) -> dict[str, Any]:
        best = self.best()
        return {"grid": list(self.grid), "tried": [{"lr": lr, "val_loss": _finite(_loss(self.results[lr])),
                                                     "diverged": bool(self.results[lr].get("diverged", True))}
                                                    for lr in sorted(self.results)],
                "best_lr": best, "at_edge": self.at_edge(), "extensions": self.extensions}


def _key(rec: dict[str, Any]) -> tuple[str, str, int]:
    return (rec["label"], f"{rec['lr']:.6g}", int(rec["seed"]))


def load_runs(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Runs already in a JSONL file (later lines win)."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                runs[_key(rec)] = rec
    return runs


def run_sweep(conf: SweepConfig, runs_path: Path, jobs: int = 2, only: Sequence[str] | None = None,
              references: bool = True, corpus_path: str | None = None,
              executor: Callable[[Iterable[Task]], Iterable[dict[str, Any]]] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs (or resumes) the whole sweep; returns :func:`summarise`'s result.

    Args:
        conf: what to train.
        runs_path: JSONL file of finished runs (read first: runs already there are not repeated).
        jobs: worker processes (one torch thread each).
        only: restrict to these optimizer names / impls / labels (torch AdamW is always kept).
        references: include the reference implementations that are installed.
        corpus_path: text file to train on (default: the stdlib corpus).
        executor: for tests: runs a batch of tasks in this process and yields records.
        log: progress lines.
    """
    all_specs = specs(conf.state_dtypes, references, only, controls=True)
    tuned = [s for s in all_specs if s.state_dtype == "fp32" or s.impl != "lowrank_optim"]
    stores = [s for s in all_specs if s not in tuned]
    searches = {s.label: LrSearch(conf.grid, conf.max_extensions) for s in tuned}
    runs = load_runs(runs_path)
    runs_path.parent.mkdir(parents=True, exist_ok=True)

    def plan(label: str) -> list[Task]:
        """Tasks this spec still needs, given the runs so far (rebuilds its search from the runs)."""
        search = LrSearch(conf.grid, conf.max_extensions)
        searches[label] = search
        for lr in conf.grid:
            rec = runs.get((label, f"{lr:.6g}", 0))
            if rec is not None:
                search.results[lr] = rec
        if len(search.results) < len(conf.grid):
            return [Task(label, lr, 0) for lr in conf.grid if lr not in search.results]
        while (nxt := search.next_point()) is not None:
            rec = runs.get((label, f"{nxt:.6g}", 0))
            if rec is None:
                return [Task(label, nxt, 0)]
            search.extensions += 1
            search.results[nxt] = rec
        best = search.best()
        if best is None:
            return []
        baseline = label.startswith("torch:")  # every "- AdamW" needs the baseline's seeds: they go first
        out = [Task(label, best, seed, 0 if baseline else 1) for seed in range(1, conf.seeds)]
        for s in stores:
            if s.optimizer == label.split("[")[0] and label.endswith("[fp32]"):
                out += [Task(s.label, best, seed, 2) for seed in range(conf.seeds)]
        return [t for t in out if t.key() not in runs]

    pending: dict[tuple[str, str, int], Task] = {}
    labels = [s.label for s in all_specs]
    t_start = time.perf_counter()
    with runs_path.open("a") as sink:
        def record(rec: dict[str, Any]) -> None:
            runs[_key(rec)] = rec
            sink.write(json.dumps(rec, default=str) + "\n")
            sink.flush()
            loss = rec.get("val_loss", rec.get("error"))
            log(f"[{time.perf_counter() - t_start:7.0f} s] {len(runs):4d} runs  {rec['label']} lr={rec['lr']:.3g} "
                f"seed={rec['seed']}: {loss}")

        def refill() -> list[Task]:
            new = []
            for label in searches:
                for t in plan(label):
                    if t.key() not in pending and t.key() not in runs:
                        pending[t.key()] = t
                        new.append(t)
            return new

        if executor is not None:
            while batch := sorted(refill(), key=lambda t: t.priority):
                for rec in executor(batch):
                    pending.pop(_key(rec), None)
                    record(rec)
        else:
            ctx = multiprocessing.get_context("fork")
            queue: list[Task] = []
            with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(conf, corpus_path, labels)) as pool:
                futures: dict[Future, Task] = {}
                while True:
                    queue += refill()
                    queue.sort(key=lambda t: t.priority)  # stable: first planned, first run within a phase
                    while queue and len(futures) < jobs:
                        t = queue.pop(0)
                        futures[pool.submit(_run_task, t)] = t
                    if not futures:
                        break
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for f in done:
                        task = futures.pop(f)
                        pending.pop(task.key(), None)
                        record(f.result())
    return summarise(conf, runs, all_specs, searches)


def _stats(values: list[float]) -> dict[str, float | None]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(finite), "std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "min": min(finite), "max": max(finite)}


def summarise(conf: SweepConfig, runs: dict[tuple[str, str, int], dict[str, Any]], all_specs: Sequence[Spec],
              searches: dict[str, LrSearch]) -> dict[str, Any]:
    """One row per spec: its lr search, best lr, held-out loss over seeds; AdamW differences."""
    rows: list[dict[str, Any]] = []
    for spec in all_specs:
        tuned_on = spec.label if spec.label in searches else f"{spec.optimizer}[fp32]"
        search = searches.get(tuned_on)
        if search is None:
            continue
        best = search.best()
        row: dict[str, Any] = {**spec.record(), "tuned_on": tuned_on, **search.summary()}
        row.pop("lr", None)
        if best is not None:
            seeds = [runs.get((spec.label, f"{best:.6g}", s)) for s in range(conf.seeds)]
            done = [r for r in seeds if r is not None]
            row["seeds_done"] = len(done)
            row["heldout_by_seed"] = [r.get("heldout_loss", math.nan) if r else None for r in seeds]
            row["heldout"] = _stats([r.get("heldout_loss", math.nan) for r in done])
            row["diverged_seeds"] = sum(bool(r.get("diverged")) or "error" in r for r in done)
            row["state_bytes_toy"] = next((r["state_bytes"] for r in done if "state_bytes" in r), None)
            row["wall_s_per_run"] = _stats([r["wall_s"] for r in done if "wall_s" in r])["mean"]
            row["errors"] = sorted({r["error"] for r in done if "error" in r})
        rows.append(row)
    base = next((r for r in rows if r["label"] == "torch:adamw"), None)
    base_mean = base["heldout"]["mean"] if base and base.get("heldout") else None
    for r in rows:
        mean = (r.get("heldout") or {}).get("mean")
        r["heldout_minus_adamw"] = mean - base_mean if mean is not None and base_mean is not None else None
    total = sum(r.get("wall_s", 0.0) for r in runs.values())
    return {"rows": rows, "n_runs": len(runs), "cpu_s_total": total,
            "complete": all(r.get("seeds_done") == conf.seeds and not r.get("at_edge") for r in rows)}


# -- command line, results and plot ------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path, title: str) -> None:
    """Selection loss against lr for every tuned spec (the grid and its extensions), best points marked."""
    from . import common

    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(10, 6))
    rows = [r for r in result["rows"] if r["label"] == r["tuned_on"]]
    for i, r in enumerate(rows):
        pts = [(p["lr"], p["val_loss"]) for p in r["tried"] if p["val_loss"] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        style = "-" if r["impl"] == "lowrank_optim" else "--"
        color = plt.cm.tab20(i % 20)
        ax.plot(xs, ys, style + "o", color=color, ms=3, lw=1, label=r["label"] + (" (edge!)" if r["at_edge"] else ""))
        if r.get("best_lr") is not None:
            best = next(p["val_loss"] for p in r["tried"] if p["lr"] == r["best_lr"])
            ax.plot([r["best_lr"]], [best], "*", color=color, ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss, selection batches, seed 0 (nats/byte)")
    ys = [p["val_loss"] for r in rows for p in r["tried"] if p["val_loss"] is not None]
    if ys:
        lo = min(ys)
        ax.set_ylim(lo - 0.05, min(max(ys), lo + 1.0) + 0.05)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title)
    common.save_figure(fig, path)


def summary(result: dict[str, Any]) -> str:
    """Markdown table: tuned lr, held-out loss mean +- std over seeds, difference to AdamW."""
    from . import common

    rows = []
    for r in sorted(result["rows"], key=lambda r: ((r.get("heldout") or {}).get("mean") or math.inf)):
        h = r.get("heldout") or {}
        rows.append({"optimizer": r["label"], "tuned lr": r.get("best_lr"),
                     "lrs tried": len(r["tried"]), "edge": "EDGE" if r["at_edge"] else "",
                     "held-out loss": None if h.get("mean") is None else f"{h['mean']:.4f} ± {h['std']:.4f}",
                     "seeds": r.get("seeds_done"), "- AdamW": r.get("heldout_minus_adamw"),
                     "diverged": r.get("diverged_seeds")})
    return common.markdown_table(rows, ["optimizer", "tuned lr", "lrs tried", "edge", "held-out loss", "seeds",
                                        "- AdamW", "diverged"])


def main(args: Any) -> list[dict[str, Any]]:
    """``--sweep`` of :mod:`benchmarks.convergence`: runs the sweep, writes JSON, plots and the frontier."""
    import dataclasses

    from . import common, frontier

    conf = SIZES[args.sweep_size]
    if args.device != "cpu":
        raise SystemExit("--sweep runs on the CPU (one torch thread per job); drop --device")
    if args.steps:
        conf = dataclasses.replace(conf, steps=args.steps)
    name = "convergence_sweep"
    out = Path(args.out)
    runs_path = out / f"{name}_runs.jsonl"
    report_only = getattr(args, "report_only", False)
    if runs_path.exists() and not (args.resume or report_only):
        runs_path.unlink()
    t0 = time.perf_counter()
    result = run_sweep(conf, runs_path, jobs=args.jobs, only=common.only_list(args.only),
                       references=not args.no_references,
                       corpus_path=None if args.corpus is None else str(args.corpus),
                       executor=(lambda tasks: iter(())) if report_only else None)
    wall = time.perf_counter() - t0
    corpus = load_corpus(args.corpus)
    config = {**conf.asdict(), "jobs": args.jobs, "torch_threads_per_job": 1, "corpus": corpus.source,
              "corpus_sha256": corpus.sha256, "corpus_bytes": corpus.n_bytes, "tokens": "utf-8 bytes",
              "size": args.sweep_size,
              "command": f"python -m benchmarks.convergence --sweep --sweep-size {args.sweep_size} --jobs {args.jobs}"
                         + (f" --steps {args.steps}" if args.steps else "")}
    if report_only:
        config["report_only"] = "summarised from the runs file without running the missing runs"
    common.write_json(out, name, "cpu", False, config, result["rows"], wall_s=wall, n_runs=result["n_runs"],
                      cpu_s_total=result["cpu_s_total"], complete=result["complete"])
    plot(result, out / f"{name}.png", f"lr sweep: {conf.steps} steps x {conf.batch_size * conf.seq_len} tokens, "
                                      "selection loss at seed 0")
    print(summary(result))
    print(f"sweep: {result['n_runs']} runs, {wall:.0f} s wall, complete={result['complete']}")
    frontier.main(["--out", str(out)])
    return result["rows"]
