"""The fastest ONNX Runtime setup for one model step of the bundled model, measured.

    python -m bench.runtime [--seconds S] [--out docs/runtime] [--model PATH] [--python VENV/bin/python]

At batch 1, 8, 64 and 256, with the state carried from step to step, one step as the server's
batcher asks for it (top_k 1, new h and c, no full log-probabilities) under each setting of
``CONFIGS``: intra-op threads, spinning, the memory arena and memory pattern, graph
optimisation levels, an offline-optimised file, IOBinding (``BoundStep``)
against ``session.run`` (``lstmd.model.graph.run``), and graph variants. Every setting runs in
every round, a short block of steps each, in a rotating order, so a slow spell of this shared
machine falls on all of them alike; the figures are medians over all steps. Beside the wall time
of a step, the CPU time of the whole process per step (``time.process_time``, so ONNX Runtime's
own threads count, spinning included): the server shares its cores with gRPC and Python, so a
setting that wins by keeping a second core busy may lose there. A second pass repeats a few
settings with another process keeping one core busy, as gRPC does under load.

Graph variants: the model re-exported with this version's exporter from its own weights
(``lstmd.export.reexport``; needs torch). Every setting's outputs are checked against the
model as given with today's server settings, from one state over several steps (top_k 5):
variants must give the same top_ids and h/c and top_logprobs within 1e-5.

ONNX Runtime's OpenVINO execution provider conflicts with the onnxruntime package, so it runs
in a process of its own venv (``--python``, e.g. ``python3 -m venv .venv-openvino &&
.venv-openvino/bin/pip install onnxruntime-openvino numpy``) beside that build's own CPU provider, on the same model
files. Results: OUT/results.json; the table is printed (docs/runtime.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "server" / "models" / "pd-english" / "1" / "model.onnx"
BATCHES = (1, 8, 64, 256)
FETCHES = ("top_logprobs", "top_ids", "h1", "c1")  # what a step of the server's batcher fetches
TOLERANCE = 1e-5
# Each round runs every setting for about BLOCK_S (one step at least), so that a round is short
# and the settings of one round see the same load on this shared machine.
BLOCK_S = 0.015


@dataclass(frozen=True)
class Config:
    """One way to run a step. The defaults are the server's settings before this benchmark."""

    name: str
    threads: int = 1
    spinning: bool = False
    spin_stop: bool = False  # session.force_spinning_stop: spin within a run only, not between runs
    arena: bool = True  # enable_cpu_mem_arena
    mem_pattern: bool = True  # enable_mem_pattern
    optimization: str = "all"
    offline: bool = False  # load ONNX Runtime's optimised file (written at ``optimization``), optimisations off
    binding: bool = False  # IOBinding into reused buffers (lstmd.model.graph.Stepper) instead of session.run
    graph: str = "given"  # "given": the model file as given; "re-exported": lstmd.export.reexport's graph
    provider: str = "cpu"  # "cpu", or "openvino" (in the --python venv)
    ov_precision: str = "FP32"


TODAY = Config("server before: 1 thread, no spinning, level all, memory pattern, session.run")
LEAN = replace(TODAY, name="graph without If", graph="re-exported")
NOW = replace(LEAN, name="server now: graph without If, no memory pattern", mem_pattern=False)
CONFIGS = [
    TODAY,
    replace(TODAY, name="server before, again (a second session: the noise)"),
    replace(TODAY, name="2 threads", threads=2),
    replace(TODAY, name="2 threads, spinning", threads=2, spinning=True),
    replace(TODAY, name="no memory arena", arena=False),
    replace(TODAY, name="no memory pattern", mem_pattern=False),
    replace(TODAY, name="optimisation basic", optimization="basic"),
    replace(TODAY, name="optimisation extended", optimization="extended"),
    replace(TODAY, name="offline-optimised file (all)", offline=True),
    replace(TODAY, name="IOBinding", binding=True),
    LEAN,
    NOW,
    replace(NOW, name="server now, IOBinding", binding=True),
    replace(NOW, name="server now, 2 threads", threads=2),
    replace(NOW, name="server now, 2 threads, spinning", threads=2, spinning=True),
    replace(NOW, name="server now, 2 threads, spinning in runs only", threads=2, spinning=True, spin_stop=True),
]
# again with another process keeping one core busy, as gRPC keeps it under load
CONTENDED = (TODAY.name, NOW.name, "server now, 2 threads", "server now, 2 threads, spinning")
# again at the server's default top_k (5) instead of 1
TOP5 = (TODAY.name, CONFIGS[1].name, NOW.name)
OPENVINO = [
    Config("onnxruntime-openvino's CPU provider", provider="cpu"),
    Config("onnxruntime-openvino's CPU provider, graph without If", provider="cpu", graph="re-exported"),
    Config("OpenVINO", provider="openvino"),
    Config("OpenVINO, graph without If", provider="openvino", graph="re-exported"),
    Config("OpenVINO, graph without If, 2 threads", provider="openvino", graph="re-exported", threads=2),
    Config("OpenVINO, graph without If, BF16", provider="openvino", graph="re-exported", ov_precision="BF16"),
]


def session(config: Config, files: dict[str, Path], work: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    if config.spin_stop:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_cpu_mem_arena = config.arena
    options.enable_mem_pattern = config.mem_pattern
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[config.optimization]
    path = files[config.graph]
    if config.offline:
        optimised = work / f"{config.graph}.{config.optimization}.onnx"
        if not optimised.exists():
            write = ort.SessionOptions()
            write.graph_optimization_level = levels[config.optimization]
            write.optimized_model_filepath = str(optimised)
            ort.InferenceSession(str(path), write, providers=["CPUExecutionProvider"])
        path = optimised
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if config.provider == "openvino":
        ov = {"device_type": "CPU", "precision": config.ov_precision, "num_of_threads": str(config.threads)}
        s = ort.InferenceSession(str(path), options, providers=[("OpenVINOExecutionProvider", ov)])
        if "OpenVINOExecutionProvider" not in s.get_providers():  # ONNX Runtime falls back to its CPU provider
            raise RuntimeError(f"the OpenVINO provider was not created with {ov} (see ONNX Runtime's log)")
        return s
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


Step = Callable[[np.ndarray, np.ndarray, np.ndarray, int], Any]  # (tokens, h, c, k) -> graph.Outputs


class BoundStep:
    """A step through IOBinding: inputs bound from numpy, outputs into buffers allocated once and
    reused (two sets, in turn, so a step's h/c can be fed straight to the next step), the
    bindings of each (batch, k) made once. What ``graph.run`` computes, bit for bit
    (tests/test_graph_runtime.py); the outputs are views, valid until the step after next."""

    def __init__(self, session: ort.InferenceSession, max_batch: int = max(BATCHES), max_k: int = 100):
        outputs = {o.name: o.shape for o in session.get_outputs()}
        self.session, self.binding, self.turn = session, session.io_binding(), 0
        self.layers, _, self.hidden = outputs["h1"]
        state = self.layers * max_batch * self.hidden
        self.buffers: list[dict[str, np.ndarray]] = [
            {
                "top_logprobs": np.empty(max_batch * max_k, np.float32),
                "top_ids": np.empty(max_batch * max_k, np.int64),
                "h1": np.empty(state, np.float32),
                "c1": np.empty(state, np.float32),
            }
            for _ in range(2)
        ]
        self.plans: dict[tuple[int, int, int], list[tuple[str, tuple[int, ...], np.ndarray, int]]] = {}
        self.inputs: tuple[np.ndarray, ...] = ()

    def __call__(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray, k: int) -> Any:
        from lstmd.model.graph import Outputs

        batch = tokens.shape[0]
        plan = self.plans.get((self.turn, batch, k))
        if plan is None:
            state = (self.layers, batch, self.hidden)
            shapes = {"top_logprobs": (batch, k), "top_ids": (batch, k), "h1": state, "c1": state}
            views = {n: self.buffers[self.turn][n][: int(np.prod(shape))].reshape(shape) for n, shape in shapes.items()}
            plan = self.plans[(self.turn, batch, k)] = [(n, shapes[n], v, v.ctypes.data) for n, v in views.items()]
        self.turn ^= 1
        self.inputs = (tokens, h, c, np.array(k, np.int64))  # alive while the binding points into them
        for name, value in zip(("tokens", "h0", "c0", "top_k"), self.inputs, strict=True):
            self.binding.bind_cpu_input(name, value)
        self.binding.clear_binding_outputs()
        for name, shape, view, address in plan:
            self.binding.bind_output(name, "cpu", 0, view.dtype, shape, address)
        self.session.run_with_iobinding(self.binding)
        out = {name: view for name, _, view, _ in plan}
        return Outputs(np.empty((batch, 0), np.float32), out["top_logprobs"], out["top_ids"], out["h1"], out["c1"])


def stepper(config: Config, s: ort.InferenceSession) -> Step:
    from lstmd.model import graph

    if config.binding:
        return BoundStep(s)
    return lambda tokens, h, c, k: graph.run(s, tokens, h, c, k, with_logprobs=False)


def check(steps: dict[str, Step], reference: str, batch: int, layers: int, hidden: int) -> dict[str, dict[str, Any]]:
    """Each way's outputs against ``reference``'s over 6 steps from one random state (top_k 5):
    the largest top_logprobs and h/c differences, and whether top_ids are equal."""
    rng = np.random.default_rng(batch)
    tokens = rng.integers(2, 10_000, (6, batch, 1))
    start = (rng.standard_normal((2, layers, batch, hidden)) * 0.5).astype(np.float32)

    def trace(step: Step) -> list[Any]:
        h, c, outs = start[0], start[1], []
        for t in tokens:
            out = step(t, h, c, 5)
            outs.append((out.top_logprobs.copy(), out.top_ids.copy(), out.h.copy(), out.c.copy()))
            h, c = outs[-1][2], outs[-1][3]
        return outs

    ref = trace(steps[reference])
    results = {}
    for name, step in steps.items():
        got = trace(step)
        top = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(got, ref, strict=True))
        state = max(float(np.abs(a[i] - b[i]).max()) for a, b in zip(got, ref, strict=True) for i in (2, 3))
        ids = all(np.array_equal(a[1], b[1]) for a, b in zip(got, ref, strict=True))
        results[name] = {"top_logprobs_max_diff": top, "state_max_diff": state, "top_ids_equal": ids,
                         "same": ids and state == 0.0 and top <= TOLERANCE}  # fmt: skip
    return results


def measure(
    steps: dict[str, Step],
    batch: int,
    seconds: float,
    layers: int,
    hidden: int,
    k: int = 1,
    spinning: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """Every way in each of ``seconds`` / (a block's time) rounds, a block of about ``BLOCK_S``
    (two steps at least) each, in a rotating order; state carried. A block's first step, which finds
    the caches full of the previous way's weights, is not timed: the server steps one session.
    Every way's blocks are equally long. Beside the medians, each way's speed-up over the first
    way as the median of its ratios round by round, which cancels the machine's slow spells
    better than a ratio of medians."""
    rng = np.random.default_rng(0)
    names = list(steps)
    state = {n: (np.zeros((layers, batch, hidden), np.float32),) * 2 for n in names}
    per_step = []
    for name in names:  # warm-up, and an estimate of a step's time
        h, c = state[name]
        for _ in range(4):
            started = time.perf_counter()
            out = steps[name](rng.integers(2, 10_000, (batch, 1)), h, c, k)
            h, c = out.h.copy(), out.c.copy()
        state[name] = (h, c)
        per_step.append(time.perf_counter() - started)
    step_s = float(np.median(per_step))
    block = max(2, round(BLOCK_S / step_s))
    rounds = max(5, round(seconds / (block * step_s)))
    times: dict[str, list[float]] = {n: [] for n in names}
    blocks: dict[str, list[float]] = {n: [] for n in names}  # each round's median
    cpu = dict.fromkeys(names, 0.0)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            tokens = rng.integers(2, 10_000, (block + 1, batch, 1))
            (h, c), step, spent = state[name], steps[name], []
            out = step(tokens[0], h, c, k)  # untimed: it brings the weights back into the caches
            h, c = out.h, out.c
            cpu_started = time.process_time()
            for t in tokens[1:]:
                started = time.perf_counter()
                out = step(t, h, c, k)
                h, c = out.h, out.c
                spent.append(time.perf_counter() - started)
            cpu[name] += time.process_time() - cpu_started
            state[name] = (h.copy(), c.copy())  # a BoundStep's buffers are reused two steps on
            times[name] += spent
            blocks[name].append(float(np.median(spent)))
            if name in spinning:
                settle()
    results = {}
    for name in names:
        ms = np.array(times[name]) * 1000
        p50 = float(np.median(ms))
        ratio = float(np.median(np.array(blocks[names[0]]) / np.array(blocks[name])))
        results[name] = {"ms_p50": p50, "ms_p10": float(np.percentile(ms, 10)), "ms_p90": float(np.percentile(ms, 90)),
                         "tokens_per_s": batch * 1000 / p50,
                         "cpu_ms_per_step": 1000 * cpu[name] / len(ms),
                         "cpu_us_per_token": 1e6 * cpu[name] / (len(ms) * batch), "steps": len(ms),
                         "speedup": ratio}  # fmt: skip
    return results


def profile(files: dict[str, Path], work: Path, batches: list[int], steps: int = 30) -> dict[str, Any]:
    """ONNX Runtime's own profile of today's settings on each graph: microseconds per step by
    operator type, and of the whole run ("model_run"), at each batch size."""
    layers, hidden = state_size(files["given"])
    out: dict[str, Any] = {}
    for name, path in files.items():
        out[name] = {}
        for batch in batches:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.enable_profiling, options.profile_file_prefix = True, str(work / f"profile-{name}-{batch}")
            s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            h = c = np.zeros((layers, batch, hidden), np.float32)
            for _ in range(steps):
                h, c = s.run(["h1", "c1", "top_ids"], {"tokens": rng.integers(2, 10_000, (batch, 1)), "h0": h,
                             "c0": c, "top_k": np.array(1, np.int64)})[:2]  # fmt: skip
            events = json.loads(Path(s.end_profiling()).read_text())
            per_op: dict[str, float] = {}
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per_op[e["args"]["op_name"]] = per_op.get(e["args"]["op_name"], 0.0) + e["dur"]
                elif e.get("cat") == "Session" and e["name"] == "model_run":
                    per_op["model_run"] = per_op.get("model_run", 0.0) + e["dur"]
            ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
            out[name][str(batch)] = {op: round(us / steps, 1) for op, us in ranked}
    return out


def settle() -> None:
    """Wait while the process still burns CPU between steps: ONNX Runtime's spinning threads go on
    spinning for some 30 ms after a run, which would land on the next block's clock and CPU
    account. Not counted for either (in a busy server the next run starts sooner)."""
    for _ in range(40):
        started = time.process_time()
        time.sleep(0.005)
        if time.process_time() - started < 0.001:
            return


def state_size(path: Path) -> tuple[int, int]:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    layers, _, hidden = next(o.shape for o in s.get_outputs() if o.name == "h1")
    return int(layers), int(hidden)


def sweep(configs: list[Config], files: dict[str, Path], work: Path, seconds: float, batches: list[int],
          contended: tuple[str, ...] = (), top5: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    """Check and measure ``configs`` at each batch size; a config that cannot load is recorded with its error."""
    layers, hidden = state_size(files["given"])
    steps: dict[str, Step] = {}
    errors: dict[str, str] = {}
    for config in configs:
        if config.graph not in files:
            errors[config.name] = f"no {config.graph} graph"
            continue
        try:
            steps[config.name] = stepper(config, session(config, files, work))
        except Exception as e:  # ONNX Runtime's own error types
            errors[config.name] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:500]}"
    reference = configs[0].name
    spins = frozenset(c.name for c in configs if c.spinning and not c.spin_stop)
    results: dict[str, Any] = {"configs": [asdict(c) for c in configs], "errors": errors, "checks": {}, "steps": {}}
    for batch in batches:
        results["checks"][str(batch)] = check(steps, reference, batch, layers, hidden)
        results["steps"][str(batch)] = measure(steps, batch, seconds, layers, hidden, spinning=spins)
        print(f"batch {batch}: " + ", ".join(f"{n} {r['ms_p50']:.3f}" for n, r in results["steps"][str(batch)].items()),
              file=sys.stderr)  # fmt: skip
    if top5:
        chosen = {n: steps[n] for n in top5 if n in steps}
        results["top_k_5"] = {str(b): measure(chosen, b, seconds, layers, hidden, 5, spins) for b in batches}
    if contended:
        with busy_core():
            chosen = {n: steps[n] for n in contended if n in steps}
            results["contended"] = {str(b): measure(chosen, b, seconds, layers, hidden, 1, spins) for b in batches}
    return results


@contextmanager
def busy_core() -> Iterator[None]:
    """Another process spinning on one core while the block runs."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def variant_files(model: Path, work: Path) -> tuple[dict[str, Path], str]:
    """The model as given and re-exported from its weights (when torch is here and the graphs differ)."""
    files = {"given": model}
    try:
        from lstmd.export.onnx_export import export_onnx
        from lstmd.export.reexport import model_from_onnx
    except ModuleNotFoundError as e:
        return files, f"no re-exported graph: {e} (the export extra)"
    lm = model_from_onnx(model)
    path = work / "re-exported.onnx"
    export_onnx(lm, lm.config.vocab_size, path)
    if path.read_bytes() == model.read_bytes():
        return files, "no re-exported graph: the model already is this exporter's graph"
    files["re-exported"] = path
    return files, ""


def openvino(python: str, files: dict[str, Path], work: Path, seconds: float, batches: list[int]) -> dict[str, Any]:
    """The OpenVINO sweep in ``python``'s environment, or why there is none."""
    command = [python, "-m", "bench.runtime", "--worker", json.dumps({"files": {k: str(v) for k, v in files.items()},
               "work": str(work), "seconds": seconds, "batches": batches})]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "proto"), str(ROOT)])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    sys.stderr.write(done.stderr[-3000:])
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def worker(spec: dict[str, Any]) -> None:
    """``--worker``: the OpenVINO sweep, in an environment with onnxruntime-openvino; JSON on stdout."""
    import onnxruntime.capi.build_and_package_info as info

    files = {k: Path(v) for k, v in spec["files"].items()}
    results = sweep(OPENVINO, files, Path(spec["work"]), spec["seconds"], spec["batches"])
    results["onnxruntime"] = f"{info.package_name} {ort.__version__}"
    results["providers"] = ort.get_available_providers()
    print(json.dumps(results))


def best(results: dict[str, Any], batch: int) -> dict[str, Any]:
    """The fastest setting whose outputs equal today's, and the fastest on one thread, by their
    speed-ups over today's (the sweep's first setting)."""
    steps, checks = results["steps"][str(batch)], results["checks"][str(batch)]
    threads = {c["name"]: c["threads"] for c in results["configs"]}
    same = {n: r for n, r in steps.items() if checks[n]["same"]}
    single = {n: r for n, r in same.items() if threads[n] == 1}
    out = {}
    for kind, pool in (("fastest", same), ("fastest on one thread", single)):
        name = max(pool, key=lambda n: pool[n]["speedup"])
        out[kind] = {"config": name, "ms_p50": pool[name]["ms_p50"], "speedup": pool[name]["speedup"]}
    return out


def table(results: dict[str, Any], batches: list[int]) -> str:
    """Markdown: median ms per step, speed-up over the first setting, tokens/s and CPU µs per
    token, one row per setting; ≠ marks outputs that differ from the first setting's."""
    head = "| setting | " + " | ".join(f"batch {b}: ms, speed-up, tok/s, CPU µs/tok" for b in batches) + " |"
    lines = [head, "|---|" + "---|" * len(batches)]
    names = list(results["steps"][str(batches[0])])
    for name in names:
        cells = []
        for b in batches:
            r, ok = results["steps"][str(b)][name], results["checks"][str(b)][name]["same"]
            cells.append(f"{r['ms_p50']:.3f}, {r['speedup']:.2f}, {r['tokens_per_s']:,.0f}, {r['cpu_us_per_token']:.0f}"
                         + ("" if ok else " ≠"))  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, error in results["errors"].items():
        lines.append(f"| {name} | " + " | ".join(["fails to load"] * len(batches)) + f" |  <!-- {error} -->")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="time per setting and batch size")
    parser.add_argument("--out", default="docs/runtime", help="folder for results.json")
    parser.add_argument("--model", default=str(BUNDLED), help="the model.onnx to measure (default: the bundled one)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--python", help="a Python with onnxruntime-openvino and numpy, for the OpenVINO sweep")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    batches = [int(b) for b in args.batches.split(",")]
    started, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    model = Path(args.model).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files, no_variant = variant_files(model, work)
        results = sweep(CONFIGS, files, work, args.seconds, batches, CONTENDED, TOP5)
        results["profile_us_per_step"] = profile(files, work, batches)
        results["openvino"] = (
            openvino(args.python, files, work, args.seconds, batches) if args.python else {"error": "no --python given"}
        )
    results["best"] = {str(b): best(results, b) for b in batches}
    results["meta"] = {
        "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else model.name,
        "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        "re-exported": no_variant or "lstmd.export.reexport of the model's own weights",
        "seconds": args.seconds,
        "block_s": BLOCK_S,
        "batches": batches,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "sweep_s": round(time.perf_counter() - started, 1),
        "load_average_at_start_and_end": [load, [round(x, 2) for x in os.getloadavg()]],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, batches))
    if "steps" in results["openvino"]:
        print()
        print(table(results["openvino"], batches))
    print(json.dumps(results["best"], indent=1))


if __name__ == "__main__":
    main()
