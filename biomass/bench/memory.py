"""Peak GPU memory of each training stage, estimated on the meta device (no memory, no weights) and checked against
a CPU measurement of the same step. `python -m biomass.bench memory EXPERIMENT [key=value ...] [--json]`.

(a) parameters + buffers, (b) gradients (trainable tensors), (c) AdamW state (fp32 exp_avg + exp_avg_sq, a 4-byte step
per tensor): counted on the model. A training forward + backward at the stage's image size and per-device batch runs
on meta under a live-storage tracker (TorchDispatchMode: a storage an op creates lives until its last tensor dies),
whose peak is what a caching allocator hands out before fragmentation. Storages are told apart by identity
(`untyped_storage()._cdata`: `data_ptr()` is 0 on meta); a view is its base's storage; parameters, buffers and the
input batch are resident and not counted there. (d) saved activations: storages marked by `saved_tensors_hooks`
and alive after the forward, each once (autocast's bf16 parameter copies included). (e) transient: the tracker's peak
less the saved activations and gradients live then (op intermediates, gradients in flight, recomputed checkpoint
blocks), plus flash attention's backward fp32 dq buffer (B*N*C*4, kernel-internal, so invisible to the tracker).
bf16: CUDA autocast emulated (it ignores meta tensors): its low-precision ops get bf16 inputs, its fp32 ops fp32,
trainable leaves' casts cached (not in inference mode). Attention: the fused kernel instead of meta's math path (N x N
scores); it saves q, k, v, out and the log-sum-exp, as CUDA's kernels do. (f) train peak = (a) + (c) + batch +
max(simulated peak, (b) + AdamW step temporaries), below the sum of the rows as activations and gradients are never
all live at once. Validation (weights, AdamW state resident) and inference: one eval batch under inference_mode. If
meta fails, CPU runs at two small sizes are scaled linearly in pixels (`method` says so). Left to the 10 % headroom:
the CUDA context, cuBLAS/cuDNN workspaces, fragmentation.
"""
from __future__ import annotations

import math
import pickle
import resource
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

GiB = 2**30
GPUS = {"T4/V100-16": 16, "L4/A10/3090/4090-24": 24, "A100-40": 40, "A100/H100-80": 80, "H200-141": 141}
HEADROOM = 0.10  # CUDA context (0.3-0.6 GiB), allocator fragmentation, nominal vs visible capacity (L4: 22.5 GiB)
PRECISIONS = ("fp32", "bf16")
_MM = ("linear matmul __matmul__ __rmatmul__ mm bmm addmm baddbmm addbmm conv1d conv2d conv3d conv_transpose1d "
       "conv_transpose2d conv_transpose3d prelu scaled_dot_product_attention").split()
_LOSS = "mse_loss smooth_l1_loss l1_loss huber_loss cross_entropy nll_loss kl_div binary_cross_entropy_with_logits"
AUTOCAST = {  # Python-level op name -> dtype, after torch's autocast lists (cuda: the estimate; cpu: measure_cpu)
    "cuda": dict.fromkeys(_MM + "einsum addmv addr mv".split(), torch.bfloat16) | dict.fromkeys(
        (_LOSS + " layer_norm group_norm softmax log_softmax exp log log1p expm1 pow __pow__ rsqrt reciprocal softplus "
         "norm cumsum logsumexp interpolate cosine_similarity").split(), torch.float32),
    "cpu": dict.fromkeys(_MM, torch.bfloat16) | dict.fromkeys(_LOSS.split(), torch.float32)}


def _build(stage_name: str, stage):
    """The one place that imports biomass's model-building code: (model, loss, n_tabular, n_targets)."""
    from biomass.engine.build import build_stage_model
    from biomass.stages import by_name

    st = by_name(stage_name)
    model, loss = build_stage_model(st, stage, load_weights=False)
    return model, loss, len(st.inputs), len(st.targets)


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _nbytes(tensors) -> int:
    return sum({_key(t): t.untyped_storage().nbytes() for t in tensors}.values())


def set_grad_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """timm's switch, on the outermost module that has it (the backbone's timm model)."""
    for m in model.modules():
        if hasattr(m, "set_grad_checkpointing"):
            return m.set_grad_checkpointing(enabled)


class _Autocast(TorchFunctionMode):
    """Autocast's casts on any device (meta included); the fused attention kernel instead of meta's math path."""

    def __init__(self, dtypes: dict, fused_attention: bool):
        super().__init__()
        self.dtypes, self.fused, self.cache, self.caching, self.attention = dtypes, fused_attention, {}, True, 0

    def _cast(self, t, dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        if (dtype == torch.bfloat16 and self.caching and t.is_leaf and t.requires_grad
                and not torch.is_inference_mode_enabled()):  # as autocast: its cache is off in inference mode
            return self.cache.setdefault(id(t), (t, t.to(dtype)))[1]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name = kwargs or {}, getattr(func, "__name__", "")
        if name in self.dtypes:
            args, kwargs = tree_map(lambda t: self._cast(t, self.dtypes[name]), (args, kwargs))
        if name == "scaled_dot_product_attention":
            a = dict(zip(("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"), args)) | kwargs
            q, k, v = a["query"], a["key"], a["value"]
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                self.attention = max(self.attention, 4 * q.numel())  # flash backward's fp32 dq buffer
            if self.fused:
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, a.get("dropout_p", 0.0), a.get("is_causal", False), attn_mask=a.get("attn_mask"),
                    scale=a.get("scale"))[0]
        return func(*args, **kwargs)


class _Live(TorchDispatchMode):
    """Bytes of the storages that ops create, live until their last tensor dies, and the peak; `mark_saved` flags
    storages autograd saved, so that the peak can be split."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.born, self.ids, self.saved = {}, {}, {}, set(), set()
        self.live = self.peak = self.largest = self.seq = self.live_saved = self.peak_saved = self.peak_seq = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in self.ids:
                continue
            key = _key(t)
            if key not in self.refs:
                if key in inputs:
                    continue  # a view of a parameter, buffer or input
                self.seq += 1
                self.refs[key], self.size[key], self.born[key] = 0, t.untyped_storage().nbytes(), self.seq
                self.live, self.largest = self.live + self.size[key], max(self.largest, self.size[key])
                if self.live > self.peak:
                    self.peak, self.peak_saved, self.peak_seq = self.live, self.live_saved, self.seq
            self.refs[key] += 1
            self.ids.add(id(t))
            weakref.finalize(t, self._release, key, id(t))
        return out

    def _release(self, key: int, tid: int) -> None:
        self.ids.discard(tid)
        self.refs[key] -= 1
        if not self.refs[key]:
            n, _, _ = self.size.pop(key), self.refs.pop(key), self.born.pop(key)
            self.live, self.live_saved = self.live - n, self.live_saved - (n if key in self.saved else 0)
            self.saved.discard(key)

    def mark_saved(self, t: torch.Tensor) -> torch.Tensor:  # the saved_tensors_hooks pack hook
        if _key(t) in self.refs and _key(t) not in self.saved:
            self.saved.add(_key(t))
            self.live_saved += self.size[_key(t)]
        return t


def _inputs(batch: int, stage, n_tab: int, n_tgt: int, device):
    (h, w), halves = stage.image.size, stage.image.layout == "halves"
    return (torch.randint(0, 256, (batch, 3, h, w * (2 if halves else 1)), dtype=torch.uint8, device=device),
            torch.randn(batch, n_tab, device=device), torch.randn(batch, n_tgt, device=device))


def _simulate(model, loss_fn, n_tab: int, n_tgt: int, stage, batch: int, precision: str, train: bool,
              target: str = "cuda", device="meta") -> dict:
    """One training forward + backward (train) or one inference_mode forward: bytes beyond the resident state."""
    image, tab, tgt = _inputs(batch, stage, n_tab, n_tgt, device)
    cast, live = _Autocast(AUTOCAST[target] if precision == "bf16" else {}, device == "meta"), _Live()
    with live:
        if not train:
            model.eval()
            with torch.inference_mode(), cast:
                model(image, tab)
            return {"peak": live.peak, "largest": live.largest}
        model.train()
        with torch.autograd.graph.saved_tensors_hooks(live.mark_saved, lambda t: t):
            with cast:
                out = model(image, tab).float()  # accelerate hands fp32 outputs to the loss
            cast.cache.clear()
            loss = loss_fn(out, tgt)
        saved, cast.caching = live.live_saved, False
        with cast:  # checkpointed blocks recompute under autocast. The engine itself: Tensor.backward and
            # autograd.backward are torch functions, which the mode would run with itself stepped out
            torch.autograd.Variable._execution_engine.run_backward((loss,), (torch.ones_like(loss),), False, False,
                                                                   (), True, True)
    grads = {_key(p.grad): p.grad for p in model.parameters() if p.grad is not None}
    at_peak = sum(g.untyped_storage().nbytes() for k, g in grads.items() if live.born.get(k, math.inf) <= live.peak_seq)
    kernel = cast.attention if target == "cuda" else 0
    return {"peak": live.peak + kernel, "largest": live.largest, "activations": saved,
            "peak_activations": live.peak_saved, "peak_gradients": at_peak, "kernel_workspace": kernel,
            "transient": live.peak + kernel - live.peak_saved - at_peak, "gradients_simulated": _nbytes(grads.values())}


def _profile(stage_name: str, stage, precision: str, ckpt: bool, batch: int | None, eval_batch: int,
             target: str = "cuda") -> dict:
    """Resident sizes, simulated train (if `batch`) and eval numbers: on meta, else CPU runs scaled in pixels."""
    def runs(stage, device):
        torch.manual_seed(0)
        with torch.device(device):
            model, loss, n_tab, n_tgt = _build(stage_name, stage)
        set_grad_checkpointing(model, ckpt)
        trainable = [p for p in model.parameters() if p.requires_grad]
        out = {"params": _nbytes(model.parameters()) + _nbytes(model.buffers()), "gradients": _nbytes(trainable),
               "n_params": sum(p.numel() for p in model.parameters()), "n_trainable": sum(p.numel() for p in trainable),
               "optimizer": sum(2 * p.numel() * 4 + 4 for p in trainable),  # exp_avg, exp_avg_sq (fp32), step
               "largest_trainable": max((p.numel() * p.element_size() for p in trainable), default=0),
               "eval": _simulate(model, loss, n_tab, n_tgt, stage, eval_batch, precision, False, target, device)}
        if batch:
            out["train"] = _simulate(model, loss, n_tab, n_tgt, stage, batch, precision, True, target, device)
        return out

    try:
        return {**runs(stage, "meta"), "method": "meta device"}
    except Exception as err:  # noqa: BLE001 - an op without a meta kernel: measure small, scale up
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
    h, w = stage.image.size
    sizes = [(max(32, round(h / f / 32) * 32), max(32, round(w / f / 32) * 32)) for f in (8, 4)]
    (p1, a), (p2, b) = [(y * x, runs(stage.model_copy(update={"image": stage.image.model_copy(
        update={"size": (y, x)})}), "cpu")) for y, x in sizes]
    for phase in [k for k in ("train", "eval") if k in b]:  # pixel-proportional quantities, extrapolated
        for k in {"peak", "largest", "activations", "transient", "kernel_workspace"} & set(b[phase]):
            b[phase][k] = max(0, int(a[phase][k] + (h * w - p1) / (p2 - p1) * (b[phase][k] - a[phase][k])))
    if (t := b.get("train")) is not None:  # where the peak falls changes with size: all saved and grads at once
        t.update(peak=t["activations"] + t["transient"] + t["gradients_simulated"], peak_activations=t["activations"],
                 peak_gradients=t["gradients_simulated"])
    return {**b, "method": f"CPU runs at {p1} and {p2} pixels scaled linearly in pixels (weights at the larger; "
                           f"train peak: saved + transient + all gradients, an upper bound); meta failed: {reason}"}


def stage_memory(stage_name: str, stage, precision: str, grad_checkpointing: bool, batch: int | None = None,
                 eval_batch: int | None = None, target: str = "cuda") -> dict:
    """Bytes of one stage's training step on one device: `batch` per device (default train.batch_size, one GPU),
    `eval_batch` default train.eval_batch_size or 2 x batch; `target` 'cpu' for what measure_cpu runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    batch = batch or stage.train.batch_size
    eval_batch = eval_batch or stage.train.eval_batch_size or 2 * batch
    r = _profile(stage_name, stage, precision, grad_checkpointing, batch, eval_batch, target)
    tr, ev, px = r["train"], r["eval"], 3 * math.prod(stage.image.size) * (2 if stage.image.layout == "halves" else 1)
    batch_bytes = batch * px  # uint8 images (tabular and targets: < 100 bytes a sample)
    step_temp = r["gradients"] if stage.optim.get("fused") is False else 2 * r["largest_trainable"]  # foreach | one tensor
    train_peak = r["params"] + r["optimizer"] + batch_bytes + max(tr["peak"], r["gradients"] + step_temp)
    out = {"stage": stage_name, "precision": precision, "grad_checkpointing": grad_checkpointing,
           "image_size": list(stage.image.size), "batch": batch, "eval_batch": eval_batch, "method": r["method"],
           **{k: r[k] for k in ("n_params", "n_trainable", "params", "gradients", "optimizer")},
           **{k: tr[k] for k in ("activations", "transient", "kernel_workspace", "gradients_simulated")},
           "largest_intermediate": tr["largest"], "batch_bytes": batch_bytes, "optimizer_step_temp": step_temp,
           "at_peak": {k: tr["peak_" + k] for k in ("activations", "gradients")} | {"transient": tr["transient"]},
           "train_peak": train_peak, "validation_peak": r["params"] + r["optimizer"] + eval_batch * px + ev["peak"],
           "inference_peak": r["params"] + eval_batch * px + ev["peak"]}
    return out | {"total_peak": (total := max(train_peak, out["validation_peak"])), "fits": gpu_fits(total)}


def gpu_fits(total_bytes: int) -> dict:
    """Which GPUs hold `total_bytes`, keeping HEADROOM (10 %) free: CUDA context, fragmentation, library workspaces."""
    usable = {name: gib * (1 - HEADROOM) for name, gib in GPUS.items()}
    return {name: {"capacity_gib": GPUS[name], "usable_gib": round(u, 2), "fits": total_bytes <= u * GiB,
                   "use": round(total_bytes / (u * GiB), 3)} for name, u in usable.items()}


def experiment_memory(cfg) -> dict:
    """Every stage x {fp32, bf16} x grad checkpointing {off, on} at one GPU's batch; inference at infer.batch_size,
    fold at a time (one model + one batch) and all folds resident (n_folds main + n_folds aux, as biomass.infer)."""
    stages = [(n, getattr(cfg, n)) for n in ("main", "aux") if getattr(cfg, n) is not None]
    rows, per, inference, b = [], {p: {} for p in PRECISIONS}, {}, cfg.infer.batch_size
    for name, stage in stages:
        configured = bool(stage.model.backbone.get("grad_checkpointing"))
        for precision in PRECISIONS:
            rows += [{**stage_memory(name, stage, precision, c), "configured": c == configured} for c in (False, True)]
            r, (h, w) = _profile(name, stage, precision, configured, None, b), stage.image.size
            per[precision][name] = (r["params"], r["eval"]["peak"] + 2 * b * 3 * h * w)  # batch + a flipped view
    folds = {n: len(s.folds.train_folds or []) or int(s.folds.splitter.get("n_splits", 5)) for n, s in stages}
    for precision, p in per.items():
        one = max(w + a for w, a in p.values())
        every = sum(folds[n] * w for n, (w, _) in p.items()) + max(a for _, a in p.values())
        inference[precision] = {"batch": b, "folds": folds, "fold_at_a_time": one, "all_folds_resident": every,
                                "fits_fold_at_a_time": gpu_fits(one), "fits_all_folds_resident": gpu_fits(every)}
    return {"name": cfg.name, "headroom": HEADROOM, "stages": rows, "inference": inference}


def measure_peak_cpu(stage_name: str, stage, batch: int, precision: str = "fp32", grad_checkpointing=None) -> int:
    """The measured peak bytes of the same training step on the CPU, in a fresh process: measure_cpu()["peak"]."""
    return measure_cpu(stage_name, stage, batch, precision, grad_checkpointing)["peak"]


def measure_cpu(stage_name: str, stage, batch: int, precision: str = "fp32", grad_checkpointing=None) -> dict:
    """A fresh process builds the model (random init) and runs two AdamW steps as engine.train_one_epoch does (the
    second with AdamW state resident; bf16: CPU autocast) under torch.profiler(profile_memory=True), which records
    every allocation and free of torch's CPU allocator in order. `peak`: their largest running sum from before the
    model exists, the CPU torch.cuda.max_memory_allocated (kernel scratch included, fragmentation not);
    `maxrss_delta`: ru_maxrss growth over the steps (allocator caching and fragmentation included)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            "from biomass.bench.memory import _measure_child; _measure_child()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False,
                          input=pickle.dumps((stage_name, stage, batch, precision, grad_checkpointing)))
    if proc.returncode:
        raise RuntimeError(f"CPU measurement failed: {proc.stderr.decode()[-2000:]}")
    return pickle.loads(proc.stdout)


def _measure_child() -> None:
    stage_name, stage, batch, precision, ckpt = pickle.loads(sys.stdin.buffer.read())
    torch.manual_seed(0)
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 - KiB on Linux
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model, loss_fn, n_tab, n_tgt = _build(stage_name, stage)
        set_grad_checkpointing(model, ckpt) if ckpt is not None else None
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)  # engine: fused=None
        image, tab, tgt = _inputs(batch, stage, n_tab, n_tgt, "cpu")
        built = rss()
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(image, tab)
            loss_fn(out.float(), tgt).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    sys.stdout.buffer.write(pickle.dumps({"peak": peak, "end": live, "maxrss_delta": rss() - built,
                                          "optimizer_state": _nbytes(state)}))


def print_report(result: dict, console=None) -> None:
    """experiment_memory's result as a rich table (GiB) and the inference lines."""
    from rich.console import Console
    from rich.table import Table

    console, gib = console or Console(width=150), lambda n: f"{n / GiB:.2f}"
    first = lambda fits: next((n for n, f in fits.items() if f["fits"]), "none")  # noqa: E731 - smallest that fits
    table = Table("stage", "prec", "ckpt", "batch", "params", "grads", "AdamW", "saved act", "transient", "train peak",
                  "val peak", "smallest GPU", title=f"{result['name']}: peak GPU memory per device, GiB "
                                                    f"({result['headroom']:.0%} headroom kept)")
    for r in result["stages"]:
        table.add_row(r["stage"], r["precision"], ("on" if r["grad_checkpointing"] else "off") +
                      ("*" if r.get("configured") else ""), str(r["batch"]),
                      *(gib(r[k]) for k in ("params", "gradients", "optimizer", "activations", "transient",
                                            "train_peak", "validation_peak")), first(r["fits"]))
    console.print(table, "* the config's setting. train peak = params + AdamW + batch + max(simulated forward/"
                  "backward peak, grads + step temporaries); val peak = params + AdamW + one eval batch", *(
                      f"inference {p}, batch {inf['batch']}, {k.replace('_', ' ')} {inf['folds']}: {gib(inf[k])} "
                      f"GiB -> {first(inf['fits_' + k])}" for p, inf in result["inference"].items()
                      for k in ("fold_at_a_time", "all_folds_resident")), sep="\n")

