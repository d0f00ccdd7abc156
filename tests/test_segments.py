"""segmented_focal_loss / SegmentedFocalLoss: many head outputs of any strides in one launch, against the
independent float64 reference (tests/reference_segments.py), on both backends."""
import pytest
import torch
from conftest import DEVICE
from helpers import CL, SUM_TOL, encode, make_categories
from reference import TOL, assert_close
from reference_segments import segments_ref, segments_value_and_grads

import focal_triton
import focal_triton.validation as V
from focal_triton import Segment

B, C, A = 2, 5, 2


def logits_(shape, seed=0, dtype=torch.float32, scale=3.0):
    """Normal values, ~1/7 of them saturated at +-25."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    flat = x.view(-1)
    flat[3::14] = 25.0
    flat[10::14] = -25.0
    return x.to(dtype).to(DEVICE)


def labels_(m, seed=1, n=B, c=C):
    kind, cls = make_categories((n, m), seed, c=c)
    return encode(kind, cls)


def per_image(v0, seed=2):
    g = torch.Generator().manual_seed(seed)
    return (v0 + torch.rand(B, generator=g, dtype=torch.float64) * 3).to(DEVICE)


# Each case: (base tensors, segments(bases) -> [(logits, labels, weights, scores, normalizer)], num_anchors,
# dtype). The bases are what the test differentiates; the segments are views of them, as a detector builds them.
def case(name, dtype=torch.float32):
    L, Q = 3, 11
    if name == "nchw":
        lab = labels_(3 * 4 * A)
        return [logits_((B, A * C, 3, 4), dtype=dtype)], lambda b: [(b[0], lab, None, None, 2.0)], A
    if name == "channels_last":
        lab = labels_(3 * 4 * A)
        return ([logits_((B, A * C, 3, 4), dtype=dtype).contiguous(memory_format=CL)],
                lambda b: [(b[0], lab, None, None, 2.0)], A)
    if name == "class_major":  # ultralytics' (B, C, A) scores
        lab = labels_(37)
        return [logits_((B, C, 37), dtype=dtype)], lambda b: [(b[0].permute(0, 2, 1), lab, None, None, 5.0)], 1
    if name == "queries":
        lab = labels_(37)
        w = torch.rand(B, 37, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        return [logits_((B, 37, C), dtype=dtype)], lambda b: [(b[0], lab, w, None, None)], 1
    if name == "stacked_lbqc":  # decoder layers stacked first, each its own labels and normalizer
        labs = [labels_(Q, seed=10 + i) for i in range(L)]
        norms = [3.0, torch.tensor(2.5, dtype=torch.float64, device=DEVICE), per_image(1.0)]
        return ([logits_((L, B, Q, C), dtype=dtype)],
                lambda b: [(b[0][i], labs[i], None, None, norms[i]) for i in range(L)], 1)
    if name == "stacked_blqc":  # (B, L, Q, C): each layer a view with gaps
        labs = [labels_(Q, seed=10 + i) for i in range(L)]
        return ([logits_((B, L, Q, C), dtype=dtype)],
                lambda b: [(b[0][:, i], labs[i], None, None, float(i + 1)) for i in range(L)], 1)
    if name == "denoising":  # the denoising queries split off along the query axis
        lab_dn, lab = labels_(6, seed=4), labels_(Q, seed=5)
        return ([logits_((B, 6 + Q, C), dtype=dtype)],
                lambda b: [(b[0][:, :6], lab_dn, None, None, 12.0), (b[0][:, 6:], lab, None, None, 4.0)], 1)
    if name == "channel_slice":  # classification channels of a channels_last (cls | box) head output
        lab = labels_(3 * 4 * A)
        return ([logits_((B, 3, 4, A * C + 3), dtype=dtype)],
                lambda b: [(b[0][..., :A * C].permute(0, 3, 1, 2), lab, None, None, None)], A)
    if name == "generic":  # a spatial crop: positions do not collapse to one axis
        lab = labels_(3 * 4 * A)
        return [logits_((B, A * C, 3, 6), dtype=dtype)], lambda b: [(b[0][:, :, :, 1:5], lab, None, None, 1.5)], A
    if name == "transposed":  # (Q, B, C) seen as (B, Q, C): the images interleave
        lab = labels_(Q)
        return [logits_((Q, B, C), dtype=dtype)], lambda b: [(b[0].permute(1, 0, 2), lab, None, None, None)], 1
    raise KeyError(name)


LAYOUTS = ["nchw", "channels_last", "class_major", "queries", "stacked_lbqc", "stacked_blqc", "denoising",
           "channel_slice", "generic", "transposed"]


def run(bases, make, num_anchors, upstream_per_segment=None, **options):
    leaves = [b.detach().clone().requires_grad_(True) for b in bases]  # clone keeps the strides
    segs = [Segment(*s) for s in make(leaves)]
    out = focal_triton.segmented_focal_loss(segs, num_anchors=num_anchors, **options)
    objective = 0.75 * out.total
    if upstream_per_segment is not None:
        objective = objective + (upstream_per_segment.to(out.per_segment.dtype) * out.per_segment).sum()
    grads = torch.autograd.grad(objective, leaves)
    return out, grads


def check(bases, make, num_anchors, upstream_per_segment=None, **options):
    dtype = bases[0].dtype
    out, grads = run(bases, make, num_anchors, upstream_per_segment, **options)
    total, per, ref_grads = segments_value_and_grads(bases, make, 0.75, upstream_per_segment,
                                                     num_anchors=num_anchors, **options)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.total.shape == () and out.per_segment.shape == per.shape and out.total.dtype == acc
    tol = TOL[torch.float64] if dtype == torch.float64 else SUM_TOL
    torch.testing.assert_close(out.per_segment.double(), per, **tol)
    torch.testing.assert_close(out.total.double(), total, **tol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype
        assert_close(g, r, dtype, what=f"grad of base {i}")
    return out, grads


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_reference(backend, layout):
    check(*case(layout))


@pytest.mark.parametrize("layout", ["stacked_blqc", "class_major"])
def test_bf16_class_aligned_views(backend, layout):
    """C = 16 bf16 (the kernels' pair reads and full tiles: CLASS_ALIGNED) on a view with gaps and on class-major
    scores; 40 positions: a full and an edge position tile in the interpreter."""
    labs = [labels_(40, seed=20 + i, c=16) for i in range(2)]
    if layout == "stacked_blqc":
        bases = [logits_((B, 2, 40, 16), dtype=torch.bfloat16)]

        def make(b):
            return [(b[0][:, i], labs[i], None, None, 3.0) for i in range(2)]
    else:
        bases = [logits_((B, 16, 40), dtype=torch.bfloat16), logits_((B, 16, 40), seed=1, dtype=torch.bfloat16)]

        def make(b):
            return [(b[i].permute(0, 2, 1), labs[i], None, None, 3.0) for i in range(2)]
    check(bases, make, 1)


def test_gradient_strides(backend):
    """Gradients w.r.t. each segment's logits: in the logits' own strides where they are dense (channels_last, a
    permuted tensor), image by image with the logits' strides within an image for a view with gaps (here a leaf
    view: it is its own source)."""
    gapped = logits_((B, 3, 11, C))[:, 1].requires_grad_(True)
    t = logits_((11, B, C)).requires_grad_(True)
    cl = logits_((B, A * C, 3, 4)).contiguous(memory_format=CL).requires_grad_(True)
    transposed = t.permute(1, 0, 2)
    out = focal_triton.segmented_focal_loss([Segment(gapped, labels_(11)), Segment(transposed, labels_(11))])
    g_gapped, g_t = torch.autograd.grad(out.total, [gapped, t])
    assert g_gapped.stride() == (11 * C, C, 1) and g_t.stride() == t.stride()
    (g_cl,) = torch.autograd.grad(focal_triton.segmented_focal_loss([Segment(cl, labels_(24))], num_anchors=A).total,
                                  [cl])
    assert g_cl.stride() == cl.stride()


def test_views_of_one_base_write_its_gradient_in_place(backend):
    """Decoder layers and denoising queries sliced from one stacked tensor: the op differentiates the stack itself
    (one source), so its gradient is written segment by segment into one stack-sized tensor with no view-backward
    copies; where the views leave part of the stack out, that part's gradient is 0. Two segments sharing logits
    keep their own sources (autograd adds their gradients)."""
    labs = [labels_(5, seed=70 + i) for i in range(4)]
    stack = logits_((2, B, 8, C)).requires_grad_(True)
    segs = [Segment(stack[i, :, :5], labs[i]) for i in range(2)] + [Segment(stack[i, :, 5:], labs[2 + i][:, :3])
                                                                      for i in range(2)]
    call = V.segments_call(segs, 1, DEFAULTS)
    assert len(call.sources) == 1 and call.sources[0] is stack
    focal_triton.segmented_focal_loss(segs).total.backward()
    _, _, (ref,) = segments_value_and_grads([stack], lambda b: [(b[0][i, :, :5], labs[i], None, None, None)
                                                                 for i in range(2)] +
                                            [(b[0][i, :, 5:], labs[2 + i][:, :3], None, None, None)
                                             for i in range(2)])
    assert stack.grad.stride() == stack.stride()
    assert_close(stack.grad, ref, torch.float32, what="stack grad")
    stack.grad = None
    partial = [segs[0], segs[2]]  # stack[1] unused: zero gradient there
    focal_triton.segmented_focal_loss(partial).total.backward()
    assert torch.equal(stack.grad[1], torch.zeros_like(stack.grad[1])) and stack.grad[0].abs().sum() > 0
    shared = [segs[0], Segment(stack[0, :, :5], labs[1])]
    assert len(V.segments_call(shared, 1, DEFAULTS).sources) == 2
    stack.grad = None
    focal_triton.segmented_focal_loss(shared).total.backward()
    _, _, (ref,) = segments_value_and_grads([stack], lambda b: [(b[0][0, :, :5], labs[0], None, None, None),
                                                                (b[0][0, :, :5], labs[1], None, None, None)])
    assert_close(stack.grad, ref, torch.float32, what="shared stack grad")


def test_sixteen_segments_mixed(backend):
    """16 segments (the most one launch takes) of several layouts and every normalizer kind, with per-segment
    upstream gradients besides the total's."""
    stack = logits_((B, 4, 3, C), seed=3)
    cls_major = logits_((B, C, 5), seed=4)
    level = logits_((B, C, 2, 2), seed=5).contiguous(memory_format=CL)  # a conv level of one anchor
    sizes = [3] * 13 + [5, 5, 4]
    labs = [labels_(m, seed=30 + i) for i, m in enumerate(sizes)]
    norms = [None, 2.0, torch.tensor(3.0, device=DEVICE), torch.arange(1, B + 1, device=DEVICE)]

    def make(b):
        st, cm, lv = b
        segs = [(st[:, i % 4], labs[i], None, None, norms[i % 4]) for i in range(13)]
        segs += [(cm.permute(0, 2, 1), labs[13], None, None, 7.0), (cm.permute(0, 2, 1), labs[14], None, None, None)]
        return segs + [(lv, labs[15], None, None, per_image(0.5))]
    upstream = torch.linspace(-1, 2, 16, dtype=torch.float64).to(DEVICE)
    check([stack, cls_major, level], make, 1, upstream_per_segment=upstream)


def test_layouts_as_the_kernel_walks_them():
    """Each case's views are read in place and walked as the kernels' three layouts say (focal_triton.layouts)."""
    from focal_triton.layouts import LAYOUT_CL, LAYOUT_GENERIC, LAYOUT_NCHW, reads_in_place, segment_layout

    expected = {"nchw": LAYOUT_NCHW, "channels_last": LAYOUT_CL, "class_major": LAYOUT_NCHW, "queries": LAYOUT_CL,
                "stacked_lbqc": LAYOUT_CL, "stacked_blqc": LAYOUT_CL, "denoising": LAYOUT_CL,
                "channel_slice": LAYOUT_CL, "generic": LAYOUT_GENERIC, "transposed": LAYOUT_CL}
    for name in LAYOUTS:
        bases, make, a = case(name)
        call = V.segments_call([Segment(*s) for s in make(bases)], a, DEFAULTS)
        for x in call.logits:
            assert segment_layout(x).kind == expected[name], name
            assert reads_in_place(x), name
            assert x.untyped_storage().data_ptr() == bases[0].untyped_storage().data_ptr(), name


DEFAULTS = dict(alpha=None, gamma=None, label_smoothing=0.0, background=-1, ignore_index=-2, check_labels=True,
                loss="fl", beta=None, iou_weighted=None)


def test_kernel_reads_the_views_in_place(monkeypatch):
    """The Triton launch gets the caller's memory (same address and strides), not a copy; a bf16 C = 16 view with
    gaps still takes the class-aligned specialization."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FOCAL_TRITON_BACKEND", "triton")
    from focal_triton.kernels import multilevel as mf

    seen = []
    real = mf._launch

    def spy(mode, levels, *args, **kwargs):
        plan, P, partials, stats = real(mode, levels, *args, **kwargs)
        seen.append([(lv.data_ptr(), lv.stride(), plan.class_aligned) for lv in levels])
        return plan, P, partials, stats
    monkeypatch.setattr(mf, "_launch", spy)
    base = logits_((B, 2, 40, 16), dtype=torch.bfloat16).requires_grad_(True)
    views = [base[:, i] for i in range(2)]
    out = focal_triton.segmented_focal_loss([Segment(v, labels_(40, c=16)) for v in views])
    out.total.backward()
    assert len(seen) == 2  # forward and backward
    for launch in seen:
        # (N, Q, C) views as (N, C, Q, 1): the same memory, strides (sn, sc, sq) (the size-1 dim's is free)
        assert [(p, s[:3]) for p, s, _ in launch] == [(v.data_ptr(), (v.stride(0), v.stride(2), v.stride(1)))
                                                      for v in views]
        assert all(aligned for _, _, aligned in launch)


def test_shared_labels_read_in_place_equal_multilevel(backend):
    """FPN levels as segments of one label tensor (column slices): read in place, one normalizer each; with the
    same normalizer on every level their total is multilevel_focal_loss's."""
    levels = [logits_((B, A * C, 4, 3), seed=1), logits_((B, A * C, 2, 2), seed=2).contiguous(memory_format=CL)]
    m = [4 * 3 * A, 2 * 2 * A]
    labels = labels_(sum(m), seed=7)
    cols = [labels[:, :m[0]], labels[:, m[0]:]]
    norm = torch.tensor([5.0, 3.0], device=DEVICE)
    segs = [Segment(lv, lab, normalizer=norm) for lv, lab in zip(levels, cols)]
    call = V.segments_call(segs, A, DEFAULTS)
    assert call.labels.data_ptr() == labels.data_ptr() and call.label_row == labels.stride(0)
    out = focal_triton.segmented_focal_loss(segs, num_anchors=A)
    ml = focal_triton.multilevel_focal_loss(levels, labels, A, normalizer=norm)
    torch.testing.assert_close(out.total, ml, **SUM_TOL)
    # and a label tensor with more columns than the levels own (its row stride is not the levels' M)
    wide = torch.cat([labels, torch.full((B, 5), -1, device=DEVICE)], 1)
    call = V.segments_call([Segment(lv, wide[:, :m[0]] if i == 0 else wide[:, m[0]:sum(m)], normalizer=norm)
                            for i, lv in enumerate(levels)], A, DEFAULTS)
    assert call.labels.data_ptr() == wide.data_ptr() and call.label_row == sum(m) + 5
    check(levels, lambda b: [(b[0], wide[:, :m[0]], None, None, 2.0), (b[1], wide[:, m[0]:sum(m)], None, None, 3.0)],
          A)


def test_varifocal_segments_with_scores(backend):
    """loss="vfl": each segment its own scores (IoU of the matched box), weights on one of them."""
    Q = 9
    labs = [labels_(Q, seed=50 + i) for i in range(2)]
    g = torch.Generator().manual_seed(9)
    scs = [torch.rand(B, Q, generator=g).to(DEVICE) for _ in range(2)]
    w = torch.rand(B, Q, generator=g).to(DEVICE)
    check([logits_((2, B, Q, C))],
          lambda b: [(b[0][0], labs[0], w, scs[0], 4.0), (b[0][1], labs[1], None, scs[1], None)], 1, loss="vfl")


@pytest.mark.parametrize("loss", ["bce", "vfl_rtdetr"])
def test_detr_and_yolo_kinds(backend, loss):
    """The YOLO (ultralytics BCE on soft scores; scores left out on one segment: hard targets) and RT-DETR
    (transformers' VFL) kinds over views of a stacked decoder tensor, against the libraries' transcribed losses."""
    Q = 9
    labs = [labels_(Q, seed=80 + i) for i in range(2)]
    g = torch.Generator().manual_seed(11)
    scs = [torch.rand(B, Q, generator=g).to(DEVICE) for _ in range(2)]
    second = None if loss == "bce" else scs[1]
    check([logits_((2, B, Q, C))],
          lambda b: [(b[0][0], labs[0], None, scs[0], 4.0), (b[0][1], labs[1], None, second, None)], 1, loss=loss)


def test_deterministic(backend):
    bases, make, a = case("stacked_lbqc")
    (o1, g1), (o2, g2) = run(bases, make, a), run(bases, make, a)
    assert torch.equal(o1.total, o2.total) and torch.equal(o1.per_segment, o2.per_segment)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_poisoned_outputs(backend, poisoned):
    """Every output element (partial sums, losses, scales, gradients) is written: NaN-filled allocations pass."""
    for name in ("stacked_blqc", "generic"):
        check(*case(name))


def test_empty_segments(backend):
    """An empty segment (no queries) adds 0 and gets an empty gradient; all segments empty (no images) give 0."""
    lab = labels_(7)
    out, grads = run([logits_((B, 7, C)), logits_((B, 0, C))],
                     lambda b: [(b[0], lab, None, None, 2.0), (b[1], lab[:, :0], None, None, 2.0)], 1)
    assert out.per_segment[1] == 0 and grads[1].shape == (B, 0, C)
    empty = torch.zeros(0, 4, C, device=DEVICE, requires_grad=True)
    out = focal_triton.segmented_focal_loss([Segment(empty, torch.zeros(0, 4, dtype=torch.int64, device=DEVICE))])
    out.total.backward()
    assert out.total == 0 and out.per_segment.tolist() == [0.0] and empty.grad.shape == empty.shape


def test_gradcheck_float64(backend):
    base = logits_((B, 2, 3, 3), dtype=torch.float64, scale=1.5).requires_grad_(True)
    labs = [labels_(3, seed=60 + i, c=3) for i in range(2)]

    def f(x):
        out = focal_triton.segmented_focal_loss([Segment(x[:, i], labs[i], normalizer=float(i + 2)) for i in range(2)],
                                                gamma=1.5)
        return out.total, out.per_segment
    # fast mode (random projections of the Jacobian): a few evaluations, the interpreter's cost in check
    assert torch.autograd.gradcheck(f, (base,), fast_mode=True)


def test_module_is_the_function(backend):
    bases, make, a = case("denoising")
    segs = [Segment(*s) for s in make(bases)]
    module = focal_triton.SegmentedFocalLoss(gamma=1.5, alpha=0.5)
    got, want = module(segs), focal_triton.segmented_focal_loss(segs, gamma=1.5, alpha=0.5)
    assert torch.equal(got.total, want.total) and torch.equal(got.per_segment, want.per_segment)
    # tuples and dicts are segments too
    as_dicts = [dict(logits=s.logits, labels=s.labels, normalizer=s.normalizer) for s in segs]
    assert torch.equal(focal_triton.segmented_focal_loss(as_dicts, gamma=1.5, alpha=0.5).total, want.total)
    with pytest.raises(ValueError, match="gamma"):
        focal_triton.SegmentedFocalLoss(gamma=-1.0)


# --- bad input: a clear error naming the segment and the argument, before anything runs ------------------------

def _bad_calls():
    x, lab = logits_((B, 7, C)), labels_(7)
    ok = Segment(x, lab)
    yield "segments must be a list", x, {}
    yield "1 to 16 segments", [ok] * 17, {}
    yield r"segments\[1\].logits must share dtype", [ok, Segment(x.double(), lab)], {}
    yield r"segments\[1\].logits must share .* N and classes", [ok, Segment(logits_((B, 7, C + 1)), lab)], {}
    yield r"segments\[1\].logits must share .* N and classes", [ok, Segment(logits_((B + 1, 7, C)),
                                                                            labels_(7, n=B + 1))], {}
    yield r"segments\[1\].logits must be 3-D", [ok, Segment(x[0], lab)], {}
    yield r"segments\[0\].logits must not overlap", [Segment(x[:, :1].expand(B, 7, C), lab)], {}
    yield r"segments\[0\].logits of shape \(N, Q, C\)", [ok], dict(num_anchors=2)
    yield r"segments\[1\].labels must have shape \(2, 6\)", [ok, Segment(x[:, :6], lab)], {}
    yield r"segments\[0\].labels must be int32 or int64", [Segment(x, lab.float())], {}
    yield r"segments\[1\].weights must have the labels' shape", [ok, Segment(x, lab, weights=torch.ones(B, 6))], {}
    yield r"segments\[1\].scores must have the labels' shape", [Segment(x, lab, scores=torch.ones(B, 7)),
                                                                Segment(x, lab, scores=torch.ones(B, 6))], \
        dict(loss="vfl")
    yield r"segments\[0\].loss='vfl' needs scores", [ok], dict(loss="vfl")
    yield r"segments\[1\].normalizer must be a number", [ok, Segment(x, lab, normalizer=torch.ones(B + 1))], {}
    yield r"segments\[1\].normalizer must be a finite number > 0", [ok, Segment(x, lab, normalizer=0.0)], {}
    yield r"segments\[1\].labels must be a class", [ok, Segment(x, lab.clamp(max=C - 1) + C)], {}
    yield r"segments\[0\] as a dict needs the keys", [dict(logits=x)], {}
    yield "gamma must be a finite number", [ok], dict(gamma=-1.0)


@pytest.mark.parametrize("message, segments, options", list(_bad_calls()),
                         ids=[m[:40] for m, _, _ in _bad_calls()])
def test_bad_input(monkeypatch, message, segments, options):
    def never(*args):
        raise AssertionError("the op ran")
    monkeypatch.setattr(focal_triton.functional, "_segments", never)
    with pytest.raises((ValueError, TypeError), match=message):
        focal_triton.segmented_focal_loss(segments, **options)
