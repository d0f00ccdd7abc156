"""Call classes of the public API: small inputs that reach every kernel specialization family, each with its check
against the independent float64 references of tests/.

A call class fixes what makes Triton compile a new kernel (dtypes, layouts, options, loss kind, reduction, integer
arguments equal to 1) and uses small sizes, odd and 16-divisible. Used three ways:
- SMOKE, on a CUDA GPU by `make gpu-check` (tests/test_cuda_smoke.py), and under the interpreter in the suite;
- ALL = SMOKE + EDGE, compiled for sm_80 and sm_90 with a stand-in driver in the suite (tests/test_jit_check.py,
  focal_triton/jit_check.py): every specialization a real call makes the JIT compile, before a GPU sees it;
- the specializations of SMOKE, listed by `make gpu-check ARGS=--dry-run` and compared with the enumeration of the
  ahead-of-time report (focal_triton/aot.py) by tests/test_jit_check.py.

`call.run(device)` returns (outputs, gradients); `call.check(device)` runs it and compares both with the reference.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from reference import TOL, assert_close, focal_loss_ref
from reference_matching import assert_matching_close
from reference_multilevel import flatten_levels, multilevel_value_and_grads, unflatten_levels
from reference_variants import class_index_ref, focal_star_ref, quality_focal_ref, reduce, varifocal_ref

import focal_triton

CL = torch.channels_last


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(shape, dtype, seed, scale=3.0):
    """Normal logits with ~1/7 of them saturated at +-25 (exact in every dtype)."""
    x = torch.randn(shape, generator=_gen(seed), dtype=torch.float64) * scale
    flat = x.view(-1)
    flat[3::14] = 25.0
    flat[10::14] = -25.0
    return x.to(dtype)


@contextlib.contextmanager
def _forced_int64(on: bool):
    """The 64-bit index specialization (chosen above 2**31 - BLOCK elements), forced on a small tensor."""
    if not on:
        yield
        return
    from focal_triton.kernels import dense as sf

    real = sf.needs_int64
    sf.needs_int64 = lambda n, block: True
    try:
        yield
    finally:
        sf.needs_int64 = real


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# ---- the dense form: sigmoid_focal_loss and its relatives -----------------------------------------------------

@dataclass
class Dense:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    reduction: str = "sum"
    loss: str = "fl"             # fl, fl_star, qfl, vfl
    t_dtype: Optional[torch.dtype] = None  # targets' dtype (default: the logits')
    gamma: float = 2.0           # FL, FL*, VFL; QFL's beta
    alpha: float = 0.25          # FL, FL*; VFL's alpha of the negatives
    beta: float = 0.0            # FL*'s shift
    iou_weighted: bool = True
    autocast: Optional[torch.dtype] = None  # run under torch.autocast of this dtype (logits of that dtype)
    misaligned: bool = False     # the logits are a view starting one element into their storage
    upstream: str = "tensor"     # "none" only: a random upstream gradient, or "sum" (loss.sum().backward())
    int64: bool = False          # force the 64-bit index specialization

    def inputs(self, device):
        n = 1
        for s in self.shape:
            n *= s
        x = _logits((n,), self.dtype, 1).reshape(self.shape)
        u = torch.rand(self.shape, generator=_gen(2), dtype=torch.float64)
        if self.loss in ("fl", "fl_star"):
            t = (u < 0.3).double()
        elif self.loss == "qfl":
            t = torch.where(u < 0.3, u / 0.3, torch.zeros_like(u))
        else:
            t = torch.where(u < 0.3, 0.05 + u * 3, torch.zeros_like(u))  # IoU-like scores of the positives
        t = t.to(self.t_dtype or self.dtype)
        if self.misaligned:  # .to(device) would copy into a fresh (aligned) allocation: slice on the device
            x = _logits((n + 1,), self.dtype, 1).to(device)[1:].reshape(self.shape)
            return x.requires_grad_(True), t.to(device)
        return x.to(device).requires_grad_(True), t.to(device)

    def _call(self, x, t):
        if self.loss == "fl":
            return focal_triton.sigmoid_focal_loss(x, t, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction)
        if self.loss == "fl_star":
            return focal_triton.sigmoid_focal_loss_star(x, t, alpha=self.alpha, gamma=self.gamma, beta=self.beta,
                                                        reduction=self.reduction)
        if self.loss == "qfl":
            return focal_triton.quality_focal_loss(x, t, beta=self.gamma, reduction=self.reduction)
        return focal_triton.varifocal_loss(x, t, alpha=self.alpha, gamma=self.gamma, iou_weighted=self.iou_weighted,
                                           reduction=self.reduction)

    def _upstream(self, out):
        if self.reduction != "none" or self.upstream == "sum":
            return None
        g = torch.randn(out.shape, generator=_gen(3), dtype=torch.float64)
        return g.to(dtype=out.dtype, device=out.device)

    def run(self, device):
        x, t = self.inputs(device)
        with _forced_int64(self.int64), _autocast(device, self.autocast):
            out = self._call(x, t)
        g = self._upstream(out)
        with _forced_int64(self.int64):
            (grad,) = torch.autograd.grad(out.sum() if g is None else out, x, g)
        return out, grad

    def reference(self, x, t, g):
        xd = x.detach().double().requires_grad_(True)
        td = t.double()
        if self.loss == "fl":
            ref = focal_loss_ref(xd, td, self.alpha, self.gamma, self.reduction)
        else:
            if self.loss == "fl_star":
                elem = focal_star_ref(xd, td, self.alpha, self.gamma, self.beta)
            elif self.loss == "qfl":
                elem = quality_focal_ref(xd, td, self.gamma)
            else:
                elem = varifocal_ref(xd, td, self.alpha, self.gamma, self.iou_weighted)
            ref = reduce(elem, self.reduction)
        up = torch.ones_like(ref) if g is None else g.double()
        (grad,) = torch.autograd.grad(ref, xd, up)
        return ref, grad

    def check(self, device):
        out, grad = self.run(device)
        x, t = self.inputs(device)
        ref, ref_grad = self.reference(x, t, self._upstream(out))
        loss_dtype = torch.float32 if self.autocast is not None else self.dtype
        assert out.dtype == loss_dtype and out.shape == (x.shape if self.reduction == "none" else ())
        assert_close(out, ref, loss_dtype, what=f"{self.name} loss")
        assert grad.dtype == self.dtype and grad.stride() == x.stride()
        assert_close(grad, ref_grad, self.dtype, what=f"{self.name} grad")


# ---- the class-index form: multilevel_focal_loss and focal_loss ------------------------------------------------

@dataclass
class Multilevel:
    name: str
    dtype: torch.dtype
    hws: Tuple[Tuple[int, int], ...]
    n: int = 2
    a: int = 3
    c: int = 5
    layout: str = "nchw"         # nchw, cl, mix (channels_last on even levels)
    labels_dtype: torch.dtype = torch.int64
    reduction: str = "sum"
    loss: str = "fl"
    gamma: Optional[float] = None
    alpha: object = None         # a number, "per_class" (a (C,) tensor) or None (the loss's default)
    beta: Optional[float] = None
    iou_weighted: Optional[bool] = None
    detach_weight: Optional[bool] = None
    class_weights: bool = False  # "bce": a (C,) tensor of class weights
    weights: bool = False
    label_smoothing: float = 0.0
    ignore_index: Optional[int] = -2
    normalizer: object = None    # None, a number, "scalar" (0-d float), "scalar_int" (0-d int64),
    #                              "per_image" (N,) float, "per_image_int" (N,) int64
    autocast: Optional[torch.dtype] = None
    stats: bool = False
    flat: bool = False           # focal_loss on (N, M, C) logits instead of the per-level form

    @property
    def m(self):
        return self.a * sum(h * w for h, w in self.hws)

    def inputs(self, device):
        levels = []
        for i, (h, w) in enumerate(self.hws):
            x = _logits((self.n, self.a * self.c, h, w), self.dtype, 10 + i).to(device)
            if self.layout == "cl" or (self.layout == "mix" and i % 2 == 0):
                x = x.contiguous(memory_format=CL)
            levels.append(x)
        g = _gen(20)
        u = torch.rand(self.n, self.m, generator=g)
        cls = torch.randint(0, self.c, (self.n, self.m), generator=g)
        labels = torch.where(u < 0.3, cls, torch.full_like(cls, -1))
        if self.ignore_index is not None:
            labels = torch.where((u >= 0.3) & (u < 0.45), torch.full_like(cls, self.ignore_index), labels)
        labels = labels.to(self.labels_dtype).to(device)
        extra = {}
        if self.weights:
            extra["weights"] = (torch.rand(self.n, self.m, generator=g) * 2).float().to(device)
        if self.loss in ("qfl", "vfl", "bce", "vfl_rtdetr", "mal", "ia_bce"):
            extra["scores"] = torch.rand(self.n, self.m, generator=g).float().to(device)
        if self.class_weights:
            extra["class_weights"] = (torch.arange(self.c, dtype=torch.float32) % 3 + 1).div(2).to(device)
        if self.alpha == "per_class":
            extra["alpha"] = (torch.arange(self.c, dtype=torch.float32) % 4 + 1).div(8).to(device)
        elif self.alpha is not None:
            extra["alpha"] = self.alpha
        norm = self.normalizer
        if norm == "scalar":
            extra["normalizer"] = torch.tensor(37.5, device=device)
        elif norm == "scalar_int":
            extra["normalizer"] = torch.tensor(41, device=device)
        elif norm == "per_image":
            extra["normalizer"] = torch.arange(1, self.n + 1, dtype=torch.float32, device=device) * 3.5
        elif norm == "per_image_int":
            extra["normalizer"] = torch.arange(1, self.n + 1, device=device) * 4
        elif norm is not None:
            extra["normalizer"] = norm
        return levels, labels, extra

    def _options(self, extra):
        opts = dict(extra, reduction=self.reduction, label_smoothing=self.label_smoothing,
                    ignore_index=self.ignore_index)
        for k in ("gamma", "beta", "iou_weighted", "detach_weight"):
            if getattr(self, k) is not None:
                opts[k] = getattr(self, k)
        if self.loss != "fl":
            opts["loss"] = self.loss
        return opts

    def _flat(self, levels):
        return flatten_levels(levels, self.a).contiguous()

    def _call(self, levels, labels, extra):
        opts = self._options(extra)
        if self.stats:
            opts["return_stats"] = True
        if self.flat:
            out = focal_triton.focal_loss(self._flat(levels), labels, **opts)
        else:
            out = focal_triton.multilevel_focal_loss(levels, labels, self.a, **opts)
        return out

    def _upstreams(self, outs):
        g = _gen(7)
        return [torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype=o.dtype, device=o.device)
                .contiguous(memory_format=CL if o.dim() == 4 and not o.is_contiguous() else torch.contiguous_format)
                for o in outs]

    def run(self, device):
        levels, labels, extra = self.inputs(device)
        leaves = [x.detach().clone().requires_grad_(True) for x in levels]
        with _autocast(device, self.autocast):
            out = self._call(leaves, labels, extra)
        stats = None
        if self.stats:
            out, stats = out
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        grads = torch.autograd.grad(outs, leaves, self._upstreams(outs) if self.reduction == "none" else None)
        return (out, stats), list(grads)

    def reference(self, levels, labels, extra, upstreams):
        """(float64 reference loss (0-d, or per-level list for "none"), per-level float64 gradients)."""
        opts = {k: v for k, v in self._options(extra).items() if k not in ("loss",)}
        if self.loss == "fl":
            opts.pop("scores", None)
            return multilevel_value_and_grads(levels, labels, self.a, grad_outputs=upstreams, **opts)
        leaves = [x.detach().double().requires_grad_(True) for x in levels]
        flat = flatten_levels(leaves, self.a)
        params = {}
        if self.loss == "fl_star":
            params = dict(alpha=opts.get("alpha", -1.0), gamma=opts.get("gamma", 1.0), beta=opts.get("beta", 0.0))
        elif self.loss == "qfl":
            params = dict(beta=opts.get("beta", 2.0))
        elif self.loss == "bce":
            params = dict(class_weights=opts.get("class_weights"))
        elif self.loss in ("vfl_rtdetr", "mal", "ia_bce"):
            defaults = {"vfl_rtdetr": (0.75, 2.0), "mal": (1.0, 1.5), "ia_bce": (0.25, 2.0)}[self.loss]
            params = dict(alpha=opts.get("alpha", defaults[0]), gamma=opts.get("gamma", defaults[1]))
        else:
            params = dict(alpha=opts.get("alpha", 0.75), gamma=opts.get("gamma", 2.0),
                          iou_weighted=opts.get("iou_weighted", True))
        kind = "vfl_rtdetr_grad" if self.loss == "vfl_rtdetr" and opts.get("detach_weight") is False else self.loss
        loss = class_index_ref(kind, flat, labels, scores=opts.get("scores"), weights=opts.get("weights"),
                               ignore_index=opts.get("ignore_index"), normalizer=opts.get("normalizer"),
                               reduction=self.reduction, **params)
        if self.reduction == "none":
            out = unflatten_levels(loss, [tuple(x.shape) for x in levels], self.a)
            grads = torch.autograd.grad(out, leaves, [g.double() for g in upstreams])
        else:
            out = loss
            grads = torch.autograd.grad(loss, leaves)
        return out, list(grads)

    def check(self, device):
        (out, stats), grads = self.run(device)
        levels, labels, extra = self.inputs(device)
        if self.reduction == "none":
            outs = list(out)
            ups = self._upstreams(outs)
            if self.flat:
                raise NotImplementedError("flat 'none' is not a call class")
            ref, ref_grads = self.reference(levels, labels, extra, ups)
            loss_dtype = torch.float32 if self.autocast is not None else self.dtype
            for i, (o, r, x) in enumerate(zip(outs, ref, levels)):
                assert o.dtype == loss_dtype and o.shape == x.shape and o.stride() == x.stride(), f"level {i}"
                assert_close(o, r, loss_dtype, what=f"{self.name} loss level {i}")
        else:
            ref, ref_grads = self.reference(levels, labels, extra, None)
            acc = torch.float64 if self.dtype == torch.float64 else torch.float32
            assert out.shape == () and out.dtype == acc
            assert_close(out, ref, acc, what=f"{self.name} loss")
        for i, (gr, r, x) in enumerate(zip(grads, ref_grads, levels)):
            # (the flat form's gradient reaches the levels through flatten_levels' permute: any strides)
            assert gr.dtype == self.dtype and (self.flat or gr.stride() == x.stride()), f"level {i}"
            assert_close(gr, r, self.dtype, what=f"{self.name} grad level {i}")
        if stats is not None:
            # The statistics' loss sums are the unnormalized per-anchor sums: their total is the loss times the
            # (number) normalizer.
            total = (stats.loss_positive.double().sum() + stats.loss_negative.double().sum()).cpu()
            scale = float(self.normalizer) if isinstance(self.normalizer, (int, float)) else 1.0
            tol = TOL[torch.float64 if self.dtype == torch.float64 else torch.float32]
            torch.testing.assert_close(total / scale, out.detach().double().cpu(), rtol=10 * tol["rtol"],
                                       atol=tol["atol"])
            counts = int(stats.num_positive.sum() + stats.num_negative.sum() + stats.num_ignored.sum())
            assert counts == labels.numel()


# ---- the focal matching cost of DETR matchers: focal_matching_cost -------------------------------------------

@dataclass
class Matching:
    name: str
    dtype: torch.dtype
    n: int = 37                  # queries (B * Q)
    c: int = 11
    g: int = 21                  # targets of the batch
    labels_dtype: torch.dtype = torch.int64
    alpha: float = 0.25
    gamma: float = 2.0

    def inputs(self, device):
        x = _logits((self.n, self.c), self.dtype, 30, scale=6.0).to(device)
        labels = torch.randint(0, self.c, (self.g,), generator=_gen(31)).to(self.labels_dtype).to(device)
        return x, labels

    def run(self, device):
        x, labels = self.inputs(device)
        return focal_triton.focal_matching_cost(x, labels, self.alpha, self.gamma), None  # no gradient

    def check(self, device):
        cost, _ = self.run(device)
        x, labels = self.inputs(device)
        assert cost.shape == (self.n, self.g) and not cost.requires_grad
        assert_matching_close(cost, x, labels, self.alpha, self.gamma, self.name)


@dataclass
class Segments:
    """segmented_focal_loss over views of a stacked (N, L, Q, C) decoder tensor (channels_last-like views with gaps,
    one normalizer kind each) and, with `generic`, a spatial crop of a conv level (the generic gather)."""
    name: str
    dtype: torch.dtype
    layers: int = 3
    q: int = 7
    c: int = 5
    generic: bool = True

    def inputs(self, device):
        stack = _logits((2, self.layers, self.q, self.c), self.dtype, 30).to(device)
        level = _logits((2, self.c, 3, 6), self.dtype, 31).to(device)
        g = _gen(32)
        labels = [torch.where(torch.rand(2, m, generator=g) < 0.3, torch.randint(0, self.c, (2, m), generator=g),
                              torch.full((2, m), -1)).to(device)
                  for m in [self.q] * self.layers + [12]]
        norms = [None, 3.5, torch.tensor(2.0, dtype=torch.float32, device=device),
                 torch.arange(1, 3, dtype=torch.float32, device=device)]
        return [stack, level], labels, norms

    def _segments(self, bases, labels, norms):
        stack, level = bases
        segs = [(stack[:, i], labels[i], None, None, norms[i % 4]) for i in range(self.layers)]
        if self.generic:
            segs.append((level[:, :, :, 1:5], labels[-1], None, None, 2.5))
        return segs

    def run(self, device):
        bases, labels, norms = self.inputs(device)
        leaves = [b.detach().clone().requires_grad_(True) for b in bases]
        out = focal_triton.segmented_focal_loss([focal_triton.Segment(*s) for s in
                                                 self._segments(leaves, labels, norms)])
        grads = torch.autograd.grad(out.total + 0.5 * out.per_segment.sum(), leaves, allow_unused=True)
        return out, [torch.zeros_like(b) if g is None else g for g, b in zip(grads, leaves)]

    def check(self, device):
        from reference_segments import segments_value_and_grads

        out, grads = self.run(device)
        bases, labels, norms = self.inputs(device)
        n = len(self._segments(bases, labels, norms))
        total, per, ref_grads = segments_value_and_grads(
            bases, lambda b: self._segments(b, labels, norms), 1.0, torch.full((n,), 0.5, dtype=torch.float64))
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        assert_close(out.per_segment, per, acc, what=f"{self.name} per-segment losses")
        assert_close(out.total, total, acc, what=f"{self.name} total")
        for i, (gr, r) in enumerate(zip(grads, ref_grads)):
            assert_close(gr, r, self.dtype, what=f"{self.name} grad of base {i}")


HW2 = ((5, 3), (1, 2))        # two odd-sized levels
HW3E = ((4, 6), (0, 3), (2, 1))  # an empty level in the middle

# The smoke set: every specialization family of the enumeration in focal_triton/aot.py with few compiles (each
# call compiles a forward, a backward and for reductions a final sum; the final sums are shared).
SMOKE = [
    # dense FL: each reduction, each of fp32 / fp16 / bf16, integer and fractional gamma, targets in float32
    Dense("dense fp32 none gamma=2 (upstream tensor)", torch.float32, (1003,), "none"),
    Dense("dense fp32 mean, one element", torch.float32, (), "mean"),
    Dense("dense fp16 none gamma=2 (upstream sum)", torch.float16, (333,), "none", upstream="sum"),
    Dense("dense fp16 mean, fp32 targets", torch.float16, (129,), "mean", t_dtype=torch.float32),
    Dense("dense bf16 mean gamma=1 alpha=-1, fp32 targets", torch.bfloat16, (2, 3, 33), "mean", gamma=1.0,
          alpha=-1.0, t_dtype=torch.float32),
    Dense("dense bf16 none gamma=0.5", torch.bfloat16, (515,), "none", gamma=0.5),
    Dense("dense fp64 none gamma=0, 64-bit indexing", torch.float64, (257,), "none", gamma=0.0, int64=True),
    Dense("dense fp64 mean gamma=1.5", torch.float64, (77,), "mean", gamma=1.5),
    Dense("dense fp64 sum, fp32 targets", torch.float64, (90,), "sum", t_dtype=torch.float32),
    Dense("dense bf16 none under autocast (float32 loss)", torch.bfloat16, (2, 300), "none", autocast=torch.bfloat16),
    Dense("dense fp16 none under autocast gamma=1.5", torch.float16, (301,), "none", gamma=1.5,
          autocast=torch.float16),
    Dense("dense fp32 sum, 64-bit indexing", torch.float32, (1001,), "sum", int64=True),
    Dense("dense bf16 none, 64-bit indexing", torch.bfloat16, (517,), "none", int64=True),
    Dense("dense fp16 mean, 64-bit indexing gamma=1.5", torch.float16, (99,), "mean", gamma=1.5, int64=True),
    # dense relatives of FL
    Dense("dense FL* fp32 sum", torch.float32, (500,), "sum", loss="fl_star", alpha=-1.0, gamma=1.0, beta=0.5),
    Dense("dense FL* bf16 none", torch.bfloat16, (300,), "none", loss="fl_star", alpha=0.25, gamma=2.0),
    Dense("dense QFL bf16 none beta=2", torch.bfloat16, (301,), "none", loss="qfl", gamma=2.0),
    Dense("dense QFL fp32 mean beta=1.5", torch.float32, (257,), "mean", loss="qfl", gamma=1.5),
    Dense("dense VFL bf16 sum gamma=2", torch.bfloat16, (300,), "sum", loss="vfl", alpha=0.75),
    Dense("dense VFL fp32 none gamma=1.5 not IoU-weighted", torch.float32, (203,), "none", loss="vfl", alpha=0.75,
          gamma=1.5, iou_weighted=False),
    # the multi-level kernel: each mode (sum / none, forward / backward), NCHW and channels_last, int32 / int64
    # labels, C % 16 == 0 and not, integer and fractional gamma, weights, per-class alpha, smoothing, the
    # normalizers, more than one image and an empty level
    Multilevel("multilevel fp32 nchw C=5 per-image normalizer", torch.float32, HW2, normalizer="per_image"),
    Multilevel("multilevel fp32 cl C=16 int32 labels, weights, smoothing, gamma=1.5", torch.float32, HW2, c=16,
               layout="cl", labels_dtype=torch.int32, weights=True, label_smoothing=0.1, gamma=1.5,
               normalizer=9.0),
    Multilevel("multilevel fp32 mix C=16 none", torch.float32, HW2, c=16, layout="mix", reduction="none"),
    Multilevel("multilevel bf16 one image A=1 C=16 cl gamma=1.5 number normalizer", torch.bfloat16, ((4, 4), (1, 1)),
               n=1, a=1, c=16, layout="cl", gamma=1.5, normalizer=7.0, labels_dtype=torch.int32),
    Multilevel("multilevel bf16 mix C=20 per-class alpha, empty level, int per-image normalizer", torch.bfloat16,
               HW3E, c=20, layout="mix", alpha="per_class", normalizer="per_image_int"),
    Multilevel("multilevel bf16 cl C=32 none, no ignore value", torch.bfloat16, HW2, c=32, layout="cl",
               reduction="none", ignore_index=None),
    Multilevel("multilevel fp16 mix C=16 sum gamma=1.5 weights", torch.float16, HW2, c=16, layout="mix", gamma=1.5,
               weights=True, labels_dtype=torch.int32),
    Multilevel("multilevel fp16 nchw C=5 int64 sum 0-d normalizer", torch.float16, HW2, normalizer="scalar"),
    Multilevel("multilevel bf16 cl C=16 none under autocast", torch.bfloat16, HW2, c=16, layout="cl",
               reduction="none", autocast=torch.bfloat16),
    Multilevel("multilevel fp16 nchw C=5 none under autocast gamma=1.5", torch.float16, HW2, reduction="none",
               autocast=torch.float16, gamma=1.5),
    Multilevel("multilevel fp64 nchw C=5 gamma=0 number normalizer", torch.float64, HW2, gamma=0.0,
               normalizer=3.0, labels_dtype=torch.int32),
    Multilevel("multilevel fp64 cl C=16 none gamma=1.5", torch.float64, HW2, c=16, layout="cl", reduction="none",
               gamma=1.5),
    Multilevel("multilevel fp64 per-image normalizer", torch.float64, HW2, normalizer="per_image"),
    Multilevel("multilevel fp64 int 0-d normalizer", torch.float64, HW2, normalizer="scalar_int"),
    Multilevel("flat focal_loss fp32 (N, M, C) int 0-d normalizer", torch.float32, HW2, c=7, flat=True,
               normalizer="scalar_int"),
    # loss statistics (the STATS forward)
    Multilevel("multilevel stats bf16 cl C=16", torch.bfloat16, HW2, c=16, layout="cl", stats=True),
    Multilevel("multilevel stats fp32 nchw C=5 gamma=1.5", torch.float32, HW2, stats=True, gamma=1.5,
               normalizer=5.0),
    # the relatives of FL in the multi-level kernel
    Multilevel("multilevel FL* fp32 cl C=16", torch.float32, HW2, c=16, layout="cl", loss="fl_star", gamma=2.0,
               beta=0.5),
    Multilevel("multilevel FL* bf16 nchw C=5 none", torch.bfloat16, HW2, loss="fl_star", reduction="none"),
    Multilevel("multilevel QFL bf16 mix C=16 beta=2", torch.bfloat16, HW2, c=16, layout="mix", loss="qfl",
               beta=2.0, normalizer="per_image"),
    Multilevel("multilevel QFL fp32 nchw C=5 none beta=1.5", torch.float32, HW2, loss="qfl", beta=1.5,
               reduction="none"),
    Multilevel("multilevel VFL fp32 cl C=16 gamma=1.5 not IoU-weighted", torch.float32, HW2, c=16, layout="cl",
               loss="vfl", gamma=1.5, iou_weighted=False),
    Multilevel("multilevel VFL bf16 nchw C=5 none", torch.bfloat16, HW2, loss="vfl", reduction="none"),
    # the DETR / YOLO kinds (each on bf16 and fp32 logits; the runtime-exponent path of the non-detached VFL)
    Multilevel("multilevel BCE bf16 cl C=16 class weights", torch.bfloat16, HW2, c=16, layout="cl", loss="bce",
               class_weights=True),
    Multilevel("multilevel BCE fp32 nchw C=5 none", torch.float32, HW2, loss="bce", reduction="none"),
    Multilevel("multilevel VFL-RT-DETR bf16 mix C=16", torch.bfloat16, HW2, c=16, layout="mix", loss="vfl_rtdetr"),
    Multilevel("multilevel VFL-RT-DETR fp32 cl C=16 detach_weight=False gamma=1.5", torch.float32, HW2, c=16,
               layout="cl", loss="vfl_rtdetr", detach_weight=False, gamma=1.5),
    Multilevel("multilevel VFL-RT-DETR bf16 nchw C=5 none detach_weight=False", torch.bfloat16, HW2,
               loss="vfl_rtdetr", detach_weight=False, reduction="none"),
    Multilevel("multilevel VFL-RT-DETR fp32 nchw C=5 none", torch.float32, HW2, loss="vfl_rtdetr", reduction="none"),
    Multilevel("multilevel MAL bf16 nchw C=5 none", torch.bfloat16, HW2, loss="mal", reduction="none"),
    Multilevel("multilevel MAL fp32 cl C=16", torch.float32, HW2, c=16, layout="cl", loss="mal"),
    Multilevel("multilevel IA-BCE bf16 cl C=16", torch.bfloat16, HW2, c=16, layout="cl", loss="ia_bce"),
    Multilevel("multilevel IA-BCE fp32 nchw C=5 none", torch.float32, HW2, loss="ia_bce", reduction="none"),
    # The other compiled-in exponents (GAMMA 1, 3, 4) and options of 16-bit logits (the pair paths).
    Multilevel("multilevel bf16 cl C=16 weights, smoothing, gamma=3", torch.bfloat16, HW2, c=16, layout="cl",
               gamma=3.0, weights=True, label_smoothing=0.1),
    Multilevel("multilevel bf16 mix C=16 gamma=1", torch.bfloat16, HW2, c=16, layout="mix", gamma=1.0),
    Multilevel("multilevel bf16 nchw C=5 gamma=4", torch.bfloat16, HW2, gamma=4.0),
    Dense("dense bf16 sum gamma=3", torch.bfloat16, (301,), "sum", gamma=3.0),
    Dense("dense bf16 sum gamma=4", torch.bfloat16, (301,), "sum", gamma=4.0),
    # the matching cost: each logit dtype with int64 labels and gamma = 2, int32 labels and a fractional gamma;
    # gamma = 0 (bf16)
    *[Matching(f"matching {str(dt)[6:]} int64 labels gamma=2", dt) for dt in (torch.float32, torch.float16,
      torch.bfloat16, torch.float64)],
    *[Matching(f"matching {str(dt)[6:]} int32 labels gamma=1.5", dt, labels_dtype=torch.int32, gamma=1.5)
      for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)],
    Matching("matching bf16 gamma=0 alpha=0.5", torch.bfloat16, gamma=0.0, alpha=0.5),
    # segments: per-segment normalizers (the final kernel's divisors), views with gaps and the generic gather
    Segments("segments bf16 decoder layers C=16 and a cropped level", torch.bfloat16, c=16),
    Segments("segments fp32 decoder layers and a cropped level", torch.float32),
    Segments("segments fp64 decoder layers", torch.float64, generic=False),
]

# Shape classes the suite uses beyond the smoke set's: sizes and integer arguments equal to 1, 16-divisible and odd
# sizes, misaligned views. They add integer specializations only where the JIT makes them (none at present: every
# integer argument is do_not_specialize'd), so they cost runs, not compiles.
EDGE = [
    Dense("edge dense fp32 sum, one element", torch.float32, (1,), "sum"),
    Dense("edge dense fp32 none, one element", torch.float32, (1, 1), "none"),
    Dense("edge dense bf16 mean, one element gamma=1", torch.bfloat16, (), "mean", gamma=1.0),
    Dense("edge dense fp16 mean, 16 elements", torch.float16, (16,), "mean"),
    Dense("edge dense fp32 sum, 16 x 64 elements gamma=1", torch.float32, (16, 64), "sum", gamma=1.0),
    Dense("edge dense fp32 sum, misaligned view", torch.float32, (999,), "sum", misaligned=True),
    Dense("edge dense bf16 none, misaligned view", torch.bfloat16, (130,), "none", misaligned=True),
    Dense("edge dense QFL fp32 mean, one element beta=1", torch.float32, (), "mean", loss="qfl", gamma=1.0),
    Dense("edge dense VFL bf16 mean, one element gamma=1", torch.bfloat16, (1,), "mean", loss="vfl", gamma=1.0),
    Dense("edge dense FL* fp32 mean, one element", torch.float32, (), "mean", loss="fl_star", alpha=-1.0, gamma=1.0),
    Multilevel("edge multilevel fp32 one image one anchor one class 1x1", torch.float32, ((1, 1),), n=1, a=1, c=1),
    Multilevel("edge multilevel bf16 one image C=1 cl none gamma=1", torch.bfloat16, ((1, 1), (2, 1)), n=1, a=1, c=1,
               layout="cl", reduction="none", gamma=1.0),
    Multilevel("edge multilevel fp32 C=16 A=16 16x16 gamma=1", torch.float32, ((16, 16),), n=1, a=16, c=16,
               layout="cl", gamma=1.0, normalizer="scalar"),
    Multilevel("edge multilevel fp16 eight levels of 1x1", torch.float16, ((1, 1),) * 8, a=1, c=3),
    Multilevel("edge multilevel fp32 per-image normalizer of one image", torch.float32, HW2, n=1,
               normalizer="per_image"),
    Multilevel("edge multilevel fp32 stats one image C=1", torch.float32, ((1, 1),), n=1, a=1, c=1, stats=True),
    Matching("edge matching fp32 one query one class one target", torch.float32, n=1, c=1, g=1),
    Matching("edge matching bf16 16 queries C=16 16 targets", torch.bfloat16, n=16, c=16, g=16),
]

# The call classes of tests/test_gpu.py and of bench/gpu_check.py's steps c-e (small sizes, the same specializations):
# compiled by the stand-in check with the rest, and by gpu-check's prep step before those steps run.
GPU_TEST_CALLS = [
    *[Dense(f"gpu tests dense {str(dt)[6:]} {r}", dt, (3001,), r) for dt in (torch.float32, torch.float16,
      torch.bfloat16) for r in ("none", "mean", "sum")],
    Dense("gpu tests dense bf16 none, 64-bit indexing with n above 2**31 - 1 (i64 n: not here)", torch.bfloat16,
          (257,), "none", int64=True),
    *[Multilevel(f"gpu tests COCO head {str(dt)[6:]} {layout}", dt, ((5, 6), (3, 3), (2, 2)), a=9, c=80,
                 layout=layout, normalizer="per_image_int") for dt in (torch.float32, torch.bfloat16)
      for layout in ("mix", "cl")],
    Multilevel("gpu tests README loss stage fp32 C=80", torch.float32, ((4, 5), (2, 3)), a=9, c=80,
               normalizer="per_image_int"),
    Multilevel("gpu tests autocast fp16 C=80 cl", torch.float16, ((4, 5), (2, 3)), a=9, c=80, layout="cl",
               normalizer="per_image_int", autocast=torch.float16),
    Multilevel("gpu tests first launch in a capture fp32 C=80 gamma=1.5", torch.float32, ((4, 5), (2, 3)), a=9, c=80,
               gamma=1.5, normalizer="per_image_int"),
    Dense("gpu tests first launch in a capture dense fp32 mean gamma=1.5", torch.float32, (3001,), "mean", gamma=1.5),
    Multilevel("gpu-check sanitizer bf16 C=20 weights", torch.bfloat16, ((9, 7), (5, 4), (1, 1)), c=20,
               layout="mix", weights=True, normalizer="per_image_int"),
    Multilevel("gpu-check sanitizer bf16 C=20 none gamma=1.5", torch.bfloat16, ((9, 7), (5, 4), (1, 1)), c=20,
               layout="mix", reduction="none", gamma=1.5),
]

ALL = SMOKE + EDGE + GPU_TEST_CALLS


def num_stages_cases():
    """(name, launch(options) -> compiled kernel) of one dense and one multi-level launch, for the check that
    num_stages changes nothing in these kernels (tuning.py does not tune it)."""
    from focal_triton.kernels import multilevel as mf
    from focal_triton.kernels import dense as sf

    def dense(options):
        x = torch.zeros(4096, dtype=torch.bfloat16)
        ce = sf.forward_constexprs(x.dtype, True, 2, False, 1024)  # reduce, GAMMA = 2, 32-bit indexing
        return sf.sigmoid_focal_fwd_kernel.warmup(x, x, torch.zeros(8), 4096, 0.75, 0.25, 2.0, 0.0, grid=(1,),
                                                  num_warps=4, **options, **ce)

    def multilevel(options):
        calls = []
        real = mf.multilevel_focal_kernel.warmup

        def spy(*args, **kwargs):
            out = real(*args, **{**kwargs, **options})
            calls.append(out)
            return out

        mf.multilevel_focal_kernel.warmup = spy
        try:
            Multilevel("", torch.bfloat16, HW2, c=16, layout="cl").run(torch.device("cpu"))
        finally:
            del mf.multilevel_focal_kernel.warmup
        return calls[0]

    return [("sigmoid_focal_fwd_kernel", dense), ("multilevel_focal_kernel", multilevel)]
