"""Issue 5, parts 1 and 2: what one training step costs with our network, as ratios.

On SDXL's content and style transformer blocks (``output_blocks.0.1`` and ``.1.1``: 1280
channels, 10 transformer blocks each, context 77 x 2048, a 32x32 latent = 1024 tokens,
batch 1) one step is forward + backward + AdamW. Variants, on the same model in one process,
timed interleaved (A B C / B C A / C A B ...) and compared by their medians:

  (a)  ``a``     no adapter; the backward runs through the input only (x requires grad);
  (b)  ``b``     a minimal hand-written LoRA on exactly the same 160 Linear layers,
                 ``base(x) + up(down(x)) * scale`` (the math of LyCORIS bypass mode);
  ours ``ours``  ``blora_network.create_network(1.0, dim, dim, None, None, model,
                 preset="content_style")`` driven as sd-scripts drives it.

``x`` requires grad in every variant, so all three run the same input-gradient backward and
the differences are the adapters alone. Modes: ``fp32`` (everything fp32) and ``bf16`` (base
weights and inputs bf16, adapters fp32, bf16 autocast: what sd-scripts does with
``--mixed_precision bf16``).

Time is reported twice: wall time and the process's CPU time (all threads; OpenMP threads
sleep instead of spinning, ``OMP_WAIT_POLICY=PASSIVE`` unless set), which holds up better
when other processes share the cores.

Memory (part 2): each variant runs ``--mem-steps`` steps in a fresh subprocess. CPU: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs after setup) minus its RSS
before the first step; CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before.
Also the bytes of the tensors autograd saves for backward in one forward (exact, noise free).

    python benchmarks/bench_step.py                 # full size, CPU, fp32 + bf16, dim 64
    python benchmarks/bench_step.py --record        # ... and append the tables to RESULTS.md
    python benchmarks/bench_step.py --profile       # where ours and (b) spend their time
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# OpenMP threads that wait by sleeping, not spinning: on a shared machine spinning threads burn
# each other's time slices, and the process CPU time (reported next to wall time) would count
# the spinning. Must be set before torch loads OpenMP; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VARIANT_LABEL = {"a": "(a) no adapter", "b": "(b) minimal LoRA", "ours": "ours", "ours:torch": "ours, LyCORIS torch backend"}
MODES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n] (default cpu)")
    p.add_argument("--size", default="full", choices=["full", "tiny"], help="SDXL width (tiny: a code-path check)")
    p.add_argument("--modes", default="fp32,bf16", help="comma list of fp32, bf16 (default fp32,bf16)")
    p.add_argument("--dims", default="64", help="comma list of ranks (default 64)")
    p.add_argument("--latent", type=int, default=32, help="latent side: 32 -> 1024 tokens (default 32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context-len", type=int, default=77)
    p.add_argument("--variants", default="a,b,ours",
                   help="comma list of a, b, ours, ours:torch (LYCORIS_KERNEL_BACKEND=torch)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds, one step per variant each (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps per memory subprocess (default 2)")
    p.add_argument("--parts", default="time,layers,memory,params", help="comma list of time, layers, memory, params")
    p.add_argument("--layer-reps", type=int, default=30, help="repetitions of the adapters-alone timing (default 30)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--profile", action="store_true", help="also profile one step of (b) and ours per mode")
    p.add_argument("--record", action="store_true", help="append the result tables to benchmarks/RESULTS.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# -- one model with every variant attached ---------------------------------------------------------
class Bench:
    def __init__(self, args, mode: str, dim: int, variants: list[str]):
        self.args, self.mode, self.dim, self.variants = args, mode, dim, variants
        self.device = torch.device(args.device)
        self.dtype = MODES[mode]
        self.size = common.size_named(args.size)
        self.model = common.build_two_blocks(self.size, self.device, self.dtype)
        self.x, self.context, self.target = common.step_inputs(
            self.size, args.latent, args.batch, args.context_len, self.device, self.dtype
        )
        self.net = self.minis = None
        self.opt = {}
        self.layers = common.preset_layers(self.model, "content_style")
        if any(v.startswith("ours") for v in variants):
            self.net, groups = common.create_ours(self.model, dim, device=self.device)
            assert [id(m) for m in common.lora_layers(self.net)] == [id(m) for m in self.layers], "ours wraps other layers"
            self.opt["ours"] = torch.optim.AdamW(groups, lr=args.lr)
        if "b" in variants:
            # Same initial weights as ours when both are here, so their losses can be compared.
            downs = [lora.lora_down.weight.detach() for lora in self.net.unet_loras] if self.net is not None else None
            scale = self.net.unet_loras[0].scale if self.net is not None else 1.0  # alpha = dim
            self.minis = common.create_minimal(self.layers, dim, scale, downs)
            self.opt["b"] = torch.optim.AdamW(self.minis.parameters(), lr=args.lr)
        self.names = common.layer_names(self.model, self.layers)
        self.switch = common.Switch(self.layers, self.net, self.minis)

    def trainable(self, variant: str) -> int:
        opt = self.opt.get("ours" if variant.startswith("ours") else variant)
        return 0 if opt is None else sum(p.numel() for g in opt.param_groups for p in g["params"])

    @contextlib.contextmanager
    def _variant(self, variant: str):
        self.switch.use("ours" if variant.startswith("ours") else variant)
        old = os.environ.get("LYCORIS_KERNEL_BACKEND")
        if variant == "ours:torch":
            os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"
        try:
            yield
        finally:
            if variant == "ours:torch":
                if old is None:
                    os.environ.pop("LYCORIS_KERNEL_BACKEND", None)
                else:
                    os.environ["LYCORIS_KERNEL_BACKEND"] = old

    @torch.no_grad()
    def loss(self, variant: str) -> float:
        with self._variant(variant), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mode == "bf16"):
            return float(F.mse_loss(self.model(self.x, self.context).float(), self.target))

    def step(self, variant: str, saved: list | None = None) -> dict:
        """forward + backward (+ AdamW step); seconds per phase and the loss."""
        opt = self.opt.get("ours" if variant.startswith("ours") else variant)
        dev = self.device
        with self._variant(variant):
            common.sync(dev)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time()
            t0 = time.perf_counter()
            hooks = _saved_tensor_counter(saved, self) if saved is not None else contextlib.nullcontext()
            with hooks, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.mode == "bf16"):
                out = self.model(self.x, self.context)
            loss = F.mse_loss(out.float(), self.target)
            common.sync(dev)
            t1 = time.perf_counter()
            loss.backward()
            common.sync(dev)
            t2 = time.perf_counter()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            self.x.grad = None
            common.sync(dev)
            t3 = time.perf_counter()
            c3 = time.process_time()
            # freed memory that glibc gave back to the kernel and takes again: each page is zeroed anew
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "total": t3 - t0, "cpu": c3 - c0, "minflt": faults,
                "loss": float(loss.detach())}


def _saved_tensor_counter(out: list, bench: Bench):
    """Count the storage bytes autograd saves for backward (parameters excluded), once each."""
    params = {p.data_ptr() for p in bench.model.parameters()}
    for opt in bench.opt.values():
        params |= {p.data_ptr() for g in opt.param_groups for p in g["params"]}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in params and ptr not in seen:
                seen[ptr] = storage.nbytes()
        except Exception:  # pragma: no cover - sparse or other odd tensors
            pass
        return t

    @contextlib.contextmanager
    def ctx():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        out.append(sum(seen.values()))

    return ctx()


# -- part 1: time -------------------------------------------------------------------------------------
def run_time(args, mode: str, dim: int, variants: list[str]) -> dict:
    bench = Bench(args, mode, dim, variants)
    assert len(bench.layers) == 160, f"expected 160 layers, got {len(bench.layers)}"
    saved = {}
    # First one step each from the same weights (variants named ours* share one network: only the
    # first of them steps), with autograd's saved tensors counted; then a forward-only loss per
    # variant: (b) and ours must agree, and differ from (a).
    first_ours = next((v for v in variants if v.startswith("ours")), None)
    for v in variants:
        if v == first_ours or not v.startswith("ours"):
            box = []
            bench.step(v, saved=box)
            saved[v] = box[0]
    check = {v: bench.loss(v) for v in variants}
    for v in variants:
        if v not in saved:
            box = []
            bench.step(v, saved=box)
            saved[v] = box[0]
    for _ in range(args.warmup):
        for v in variants:
            bench.step(v)
    times = {v: [] for v in variants}
    n = len(variants)
    for r in range(args.rounds):
        order = variants[r % n :] + variants[: r % n]
        for v in order:
            times[v].append(bench.step(v))
        print(f"  {mode} dim {dim} round {r + 1}/{args.rounds}: "
              + ", ".join(f"{v} {times[v][-1]['total']:.3f}s" for v in variants), flush=True)
    result = {
        "mode": mode, "dim": dim, "times": times, "saved": saved, "check": check,
        "trainable": {v: bench.trainable(v) for v in variants}, "layers": len(bench.layers),
        "names": bench.names, "module": type(bench.net.unet_loras[0]).__name__ if bench.net is not None else None,
    }
    del bench
    gc.collect()
    return result


def median(values, key="total"):
    return statistics.median(v[key] for v in values)


def time_tables(results: list[dict], variants: list[str]) -> str:
    rows, detail, checks = [], [], []
    ours_variants = [v for v in variants if v.startswith("ours")]
    for res in results:
        t = res["times"]
        med = {v: median(t[v]) for v in variants}
        cpu = {v: median(t[v], "cpu") for v in variants}
        row = [res["mode"], res["dim"]] + [f"{med[v]:.3f}" for v in variants]
        if "b" in variants:
            for v in ours_variants:
                paired = [o["total"] / b["total"] for o, b in zip(t[v], t["b"])]
                row.append(f"**{med[v] / med['b']:.3f}** ({min(paired):.3f}-{max(paired):.3f})")
                row.append(f"{cpu[v] / cpu['b']:.3f}")
        if "a" in variants and "b" in variants:
            row.append(f"{med['b'] / med['a']:.3f} / {cpu['b'] / cpu['a']:.3f}")
        rows.append(row)
        for v in variants:
            detail.append([res["mode"], res["dim"], VARIANT_LABEL[v]]
                          + [f"{median(t[v], k):.3f}" for k in ("fwd", "bwd", "opt", "total", "cpu")]
                          + [f"{median(t[v], 'minflt'):.0f}"])
        c = res["check"]
        if "b" in c:
            ref = c["b"]
            checks.append(
                f"{res['mode']} dim {res['dim']}: loss after one AdamW step from the same weights: "
                + ", ".join(f"{v} {c[v]:.7g}" for v in variants)
                + "".join(f"; |{v} - b| = {abs(c[v] - ref):.2g}" for v in ours_variants)
                + (f"; |a - b| = {abs(c['a'] - ref):.2g}" if "a" in c else "")
                + (f" (our adapter modules: {res['module']})" if res.get("module") else "")
            )
    header = ["mode", "dim"] + [f"{VARIANT_LABEL[v]} s" for v in variants]
    if "b" in variants:
        for v in ours_variants:
            header += [f"{v} / (b), wall (per-round range)", f"{v} / (b), CPU time"]
    if "a" in variants and "b" in variants:
        header.append("(b) / (a), wall / CPU: price of B-LoRA")
    out = "Median step time (forward + backward + AdamW), s:\n\n" + common.table(header, rows)
    out += ("\n\nMedian per phase, s (wall; CPU = process CPU time of the whole step, all threads):\n\n"
            + common.table(["mode", "dim", "variant", "forward", "backward", "AdamW", "step", "step CPU",
                            "minor page faults"], detail))
    if checks:
        out += "\n\nSame math check (all start from the same weights):\n\n" + "\n".join(f"- {c}" for c in checks)
    return out


# -- part 2: memory ---------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def memory_child(args) -> None:
    mode, dim, variant = args.child.split(":", 2)
    dim = int(dim)
    import blora_network.network.kohya  # noqa: F401  every variant's process holds LyCORIS and what it imports (~180 MB
    # RSS: transformers, peft, dynamo), as sd-scripts' does; only ours would otherwise pay for it
    bench = Bench(args, mode, dim, [variant])
    cuda = bench.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            method = "VmHWM after clear_refs"
        except OSError:
            method = "VmHWM (not reset)"
        before = _status("VmRSS")
    for _ in range(args.mem_steps):
        bench.step(variant)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status("VmHWM")
    module = type(bench.net.unet_loras[0]).__name__ if bench.net is not None else None
    print("MEMJSON " + json.dumps({"before": before, "peak": peak, "method": method, "trainable": bench.trainable(variant),
                                   "module": module}))


# glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so peak RSS
# then depends on the order of allocations as much as on their sizes: measured that way, (b) and ours
# differed by up to 0.9 GiB at fp32 with identical tensors. A fixed 128 KiB threshold maps every
# tensor of that size or more on its own and unmaps it when freed: peak RSS follows live tensors.
MMAP_THRESHOLD = "131072"


def run_memory(args, mode: str, dim: int, variants: list[str]) -> dict:
    out = {}
    for v in variants:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{mode}:{dim}:{v}"]
        for opt in ("device", "size", "latent", "batch", "context_len", "mem_steps", "lr"):
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
        env = dict(os.environ)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [l for l in proc.stdout.splitlines() if l.startswith("MEMJSON ")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"memory child {v} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        out[v] = json.loads(line[0][len("MEMJSON "):])
        if out[v].get("module"):
            print(f"  memory {mode} dim {dim} {v}: adapter modules are {out[v]['module']}")
        print(f"  memory {mode} dim {dim} {v}: step peak {(out[v]['peak'] - out[v]['before']) / 2**20:.0f} MiB "
              f"over {out[v]['before'] / 2**20:.0f} MiB", flush=True)
    return out


def memory_table(mem: dict, saved: dict, variants: list[str]) -> str:
    rows = []
    method = ""
    for (mode, dim), per in mem.items():
        for v in variants:
            m = per[v]
            method = m["method"]
            sv = saved.get((mode, dim), {}).get(v)
            rows.append([mode, dim, VARIANT_LABEL[v], f"{(m['peak'] - m['before']) / 2**20:.0f}",
                         f"{m['peak'] / 2**20:.0f}", "" if sv is None else f"{sv / 2**20:.1f}"])
        if "b" in per:
            for v in [v for v in variants if v.startswith("ours")]:
                o, b = per[v], per["b"]
                so, sb = saved.get((mode, dim), {}).get(v), saved.get((mode, dim), {}).get("b")
                rows.append([mode, dim, f"**{v} / (b)**", f"**{(o['peak'] - o['before']) / max(1, b['peak'] - b['before']):.3f}**",
                             f"**{o['peak'] / b['peak']:.3f}**", "" if not (so and sb) else f"{so / sb:.3f}"])
    header = ["mode", "dim", "variant", "step peak over setup, MiB", "process peak, MiB", "saved for backward, MiB"]
    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    return (f"Peak memory ({method}, MALLOC_MMAP_THRESHOLD_={threshold}; one fresh process per variant, "
            f"{'all' if 'cuda' in method else 'RSS of'} the whole process):\n\n" + common.table(header, rows))


def params_table(counts: dict, size: str) -> str:
    """``counts``: {dim: (layers, trainable params)}."""
    rows = []
    for dim, (layers, ours) in sorted(counts.items()):
        row = [dim, layers, f"{ours:,}"]
        if size == "full":
            whole = common.whole_unet_lora_params(dim)
            row += [f"{whole['unet_modules']}", f"{whole['unet_params']:,}", f"{ours / whole['unet_params']:.3f}",
                    f"{whole['unet_params'] + whole['te_params']:,}"]
        rows.append(row)
    header = ["dim", "B-LoRA layers", "B-LoRA trainable params"]
    if size == "full":
        header += ["whole-UNet LoRA layers (sd-scripts default)", "whole-UNet LoRA params", "B-LoRA / whole-UNet",
                   "whole UNet + both text encoders"]
    return "Trainable parameters (same rank; sd-scripts networks.lora default targets):\n\n" + common.table(header, rows)


# -- the adapters alone: the eight attention projections of one transformer block -----------------------
class OneBlockProjections(torch.nn.Module):
    """The 8 Linear layers B-LoRA trains in one transformer block, with the content block's paths."""

    def __init__(self, size, device, dtype):
        super().__init__()
        c, ctx = size.model_channels * 4, size.context_dim
        attn = lambda kv_in: torch.nn.ModuleDict({  # noqa: E731
            "to_q": torch.nn.Linear(c, c, bias=False), "to_k": torch.nn.Linear(kv_in, c, bias=False),
            "to_v": torch.nn.Linear(kv_in, c, bias=False), "to_out": torch.nn.ModuleList([torch.nn.Linear(c, c)])})
        block = torch.nn.Module()
        block.transformer_blocks = torch.nn.ModuleList([torch.nn.Module()])
        block.transformer_blocks[0].attn1 = attn(c)
        block.transformer_blocks[0].attn2 = attn(ctx)
        self.output_blocks = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Identity(), block])])
        self.to(device=device, dtype=dtype).requires_grad_(False)
        self.t = block.transformer_blocks[0]

    def forward(self, h, context):
        """Every projection once, on the input it sees in the UNet; the sum of their means."""
        out = 0
        for a, kv in ((self.t.attn1, h), (self.t.attn2, context)):
            for y in (a["to_q"](h), a["to_k"](kv), a["to_v"](kv), a["to_out"][0](h)):
                out = out + y.float().mean()
        return out


def run_layers(args, mode: str, dim: int, variants: list[str], reps: int) -> dict:
    """Interleaved short timings of the 8 adapted projections alone (forward + backward to input and adapters)."""
    device, dtype = torch.device(args.device), MODES[mode]
    size = common.size_named(args.size)
    model = OneBlockProjections(size, device, dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
    layers = common.preset_layers(model, "content")
    net, _ = common.create_ours(model, dim, preset="content", device=device)
    downs = [lora.lora_down.weight.detach() for lora in net.unet_loras]
    minis = common.create_minimal(layers, dim, net.unet_loras[0].scale, downs)
    switch = common.Switch(layers, net, minis)
    tokens = args.latent ** 2
    h = torch.randn(args.batch, tokens, size.model_channels * 4, generator=gen).to(device, dtype).requires_grad_(True)
    ctx = torch.randn(args.batch, args.context_len, size.context_dim, generator=gen).to(device, dtype)
    times = {v: [] for v in variants}

    def once(v):
        switch.use("ours" if v.startswith("ours") else v)
        old = os.environ.get("LYCORIS_KERNEL_BACKEND")
        if v == "ours:torch":
            os.environ["LYCORIS_KERNEL_BACKEND"] = "torch"
        common.sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = model(h, ctx)
        loss.backward()
        common.sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if v == "ours:torch":
            os.environ.pop("LYCORIS_KERNEL_BACKEND", None) if old is None else os.environ.__setitem__("LYCORIS_KERNEL_BACKEND", old)
        h.grad = None
        for prm in list(net.parameters()) + list(minis.parameters()):
            prm.grad = None
        return dt, dc

    for _ in range(3):
        for v in variants:
            once(v)
    n = len(variants)
    for r in range(reps):
        for v in variants[r % n:] + variants[: r % n]:
            times[v].append(once(v))
    return {"mode": mode, "dim": dim, "times": times, "layers": len(layers)}


def layers_table(results: list[dict], steps: dict, variants: list[str]) -> str:
    rows = []
    ours_variants = [v for v in variants if v.startswith("ours")]
    for res in results:
        t = res["times"]
        wall = {v: statistics.median(x[0] for x in t[v]) for v in variants}
        cpu = {v: statistics.median(x[1] for x in t[v]) for v in variants}
        row = [res["mode"], res["dim"]] + [f"{wall[v] * 1e3:.1f}" for v in variants]
        for v in ours_variants:
            if "b" in variants:  # noqa: SIM102
                delta = 20 * (wall[v] - wall["b"])  # 2 B-LoRA blocks x 10 transformer blocks per step
                delta_cpu = 20 * (cpu[v] - cpu["b"])
                step = steps.get((res["mode"], res["dim"]))
                row += [f"{wall[v] / wall['b']:.3f} / {cpu[v] / cpu['b']:.3f}", f"{delta:+.3f} / {delta_cpu:+.3f}"]
                row.append("" if step is None else f"**{1 + delta / step[0]:.3f}** / {1 + delta_cpu / step[1]:.3f}")
        rows.append(row)
    header = ["mode", "dim"] + [f"{VARIANT_LABEL[v]} ms" for v in variants]
    for v in ours_variants:
        header += [f"{v} / (b) here, wall / CPU", f"{v} - (b) per step (x20 blocks), s wall / CPU",
                   "step ratio it implies: 1 + that / (b)'s step, wall / CPU"]
    return ("The 8 adapted projections of one transformer block alone (forward + backward; short interleaved "
            f"repetitions, median of {len(results[0]['times'][variants[0]]) if results else 0}): the only code that differs "
            "between the variants, timed where contention averages out better than in a 15 s step:\n\n"
            + common.table(header, rows))


# -- profile --------------------------------------------------------------------------------------------
def run_profile(args, mode: str, dim: int) -> str:
    """torch.profiler on one step of (b) and ours: which ops ours runs that (b) does not."""
    from torch.profiler import ProfilerActivity, profile

    variants = ["b", "ours"]
    bench = Bench(args, mode, dim, variants)
    for v in variants:
        bench.step(v)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    sort = "self_device_time_total" if bench.device.type == "cuda" else "self_cpu_time_total"
    text, counts = [], {}
    for v in variants:
        with profile(activities=activities, record_shapes=True) as prof:
            r = bench.step(v)
        avg = prof.key_averages()
        counts[v] = {(e.key, str(e.input_shapes)): (e.count, e.self_cpu_time_total)
                     for e in prof.key_averages(group_by_input_shape=True)}
        text.append(f"#### {mode} dim {dim}: {VARIANT_LABEL[v]} (step {r['total']:.3f} s wall, {r['cpu']:.3f} s CPU "
                    "under the profiler)\n")
        text.append("```\n" + avg.table(sort_by=sort, row_limit=12, max_name_column_width=40) + "\n```\n")
    keys = set().union(*(set(c) for c in counts.values()))
    diff = []
    for key in keys:
        calls = [counts[v].get(key, (0, 0.0))[0] for v in variants]
        ms = [counts[v].get(key, (0, 0.0))[1] / 1e3 for v in variants]
        if len(set(calls)) > 1:
            diff.append([f"{key[0]} {key[1]}"] + calls + [f"{m:.1f}" for m in ms])
    diff.sort(key=lambda r: -abs(float(r[-1]) - float(r[-2])))
    text.append("Ops (by input shapes) whose call count differs between the two, largest ours - (b) self CPU "
                "time first (self CPU time is noisy from one step to the next; the counts are exact):\n\n"
                + common.table(["op", "calls (b)", "calls ours", "self CPU ms (b)", "self CPU ms ours"], diff[:20]))
    del bench
    gc.collect()
    return "\n".join(text)


def main(argv=None, *, title="Training step (issue 5, parts 1-2)", prog_parser=None) -> int:
    args = (prog_parser or parser()).parse_args(argv)
    if args.child:
        memory_child(args)
        return 0
    modes, dims, variants, parts = split(args.modes), [int(d) for d in split(args.dims)], split(args.variants), split(args.parts)
    info = common.machine(args.device)
    print(f"{title}: device {args.device}, size {args.size}, modes {modes}, dims {dims}, variants {variants}")
    for k, v in info.items():
        print(f"  {k}: {v}")
    t0 = time.perf_counter()
    results, mem, saved = [], {}, {}
    sections = []
    if "time" in parts or "params" in parts:
        for mode in modes:
            for dim in dims:
                res = run_time(args, mode, dim, variants) if "time" in parts else None
                if res:
                    results.append(res)
                    saved[(mode, dim)] = res["saved"]
        if results:
            sections.append(time_tables(results, variants))
    if "layers" in parts:
        steps = {(r["mode"], r["dim"]): (median(r["times"]["b"]), median(r["times"]["b"], "cpu"))
                 for r in results if "b" in r["times"]}
        lres = [run_layers(args, mode, dim, variants, args.layer_reps) for mode in modes for dim in dims]
        sections.append(layers_table(lres, steps, variants))
    if "memory" in parts:
        for mode in modes:
            for dim in dims:
                mem[(mode, dim)] = run_memory(args, mode, dim, variants)
        sections.append(memory_table(mem, saved, variants))
    if "params" in parts:
        counts = {r["dim"]: (r["layers"], r["trainable"].get("ours") or r["trainable"].get("b")) for r in results}
        for (mode, dim), per in mem.items():
            got = [m["trainable"] for v, m in per.items() if v != "a"]
            if dim not in counts and got:
                counts[dim] = (160, got[0])
        if counts:
            sections.append(params_table(counts, args.size))
    if args.profile:
        for mode in modes:
            sections.append(run_profile(args, mode, dims[0]))
    setup = (f"parts {','.join(parts)}{' + profile' if args.profile else ''}; size {args.size}, latent {args.latent}x{args.latent} "
             f"({args.latent ** 2} tokens), batch {args.batch}, context {args.context_len}"
             + (f", {args.rounds} timed rounds after {args.warmup} warm-up" if "time" in parts else "")
             + (f", {args.layer_reps} repetitions of the adapters alone" if "layers" in parts else "")
             + (f", {args.mem_steps} steps per memory process" if "memory" in parts else "")
             + f"; wall time {time.perf_counter() - t0:.0f} s")
    body = setup + "\n\n" + "\n\n".join(sections)
    print()
    print(body)
    if args.record:
        common.record(title, info, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
