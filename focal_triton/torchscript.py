"""TorchScript: each public function is also a registered op, ``focal_triton::api_<name>``, whose kernel is the
function itself, so scripted code gets the same validation, errors, autocast rule and registered loss ops as eager
code (on CUDA and CPU alike).

- A call from scripted code compiles to that op: the functions are registered as TorchScript builtins (the table
  torch uses for its own functions), so keyword-only arguments, a per-class alpha tensor, a number or tensor
  normalizer and ``int`` values where the signature says float all work as in eager code.
- ``torch.jit.script(focal_triton.sigmoid_focal_loss)`` (scripting a dense function itself, as torchvision's
  ``test_jit`` and detectron2's ``sigmoid_focal_loss_jit`` do) compiles its ``torch.jit.is_scripting()`` branch,
  which calls the same op.

The op's schema is built from the function's signature (same names, order and defaults); ``Scalar`` for numbers,
so that the kernel sees the Python int or float the caller wrote and checks it as eager code does. A per-class
alpha or a tensor normalizer selects an overload. Not under TorchScript: ``return_stats=True`` (a Python
`LossStatistics`) and ``multilevel_focal_loss(reduction="none")`` (a list where "sum" gives a tensor: one op
returns one type); both raise a ValueError that says so.
"""
import inspect
import itertools

import torch

try:  # torch's table of TorchScript builtins: a private API, absent from a torch that drops or renames it
    from torch.jit._builtins import _register_builtin
except ImportError:  # then the ops still exist (torch.ops.focal_triton.api_*), but scripted calls of the
    _register_builtin = None  # functions do not compile to them; everything else works

from . import functional as F

# The schema type of every argument of the public functions: numbers as Scalar (int or float) and options as
# optional, so that the kernel, the function itself, checks what the caller wrote as eager code does.
_TYPES = {
    "inputs": "Tensor", "targets": "Tensor", "logits": "Tensor", "labels": "Tensor", "level_logits": "Tensor[]",
    "num_anchors": "int", "alpha": "Scalar?", "gamma": "Scalar?", "beta": "Scalar?", "reduction": "str",
    "iou_weighted": "bool?", "weights": "Tensor?", "label_smoothing": "Scalar", "background": "int",
    "ignore_index": "int?", "normalizer": "Scalar?", "check_labels": "bool", "loss": "str", "scores": "Tensor?",
    "return_stats": "bool", "class_weights": "Tensor?", "detach_weight": "bool?",
}
# Arguments that take a number or a tensor: one overload per choice (the default one takes numbers).
_TENSOR_OR_NUMBER = ("alpha", "normalizer")

_LIB = torch.library.Library("focal_triton", "FRAGMENT")


def _argument(p: inspect.Parameter, tensor: bool) -> str:
    if tensor:  # the overload taking a tensor for this argument: required, no default
        return f"Tensor {p.name}"
    default = "" if p.default is inspect.Parameter.empty else f"={p.default!r}"
    return f"{_TYPES[p.name]} {p.name}{default}"


def _schemas(fn):
    """(overload name, schema) of fn's op: its arguments in order, keyword-only after `*`, returning a Tensor."""
    params = list(inspect.signature(fn).parameters.values())
    keyword_only = {p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY}
    choices = [name for name in _TENSOR_OR_NUMBER if name in keyword_only]
    for tensors in itertools.product((False, True), repeat=len(choices)):
        as_tensor = {name for name, t in zip(choices, tensors) if t}
        args, star = [], False
        for p in params:
            if p.kind == inspect.Parameter.KEYWORD_ONLY and not star:
                args.append("*")
                star = True
            args.append(_argument(p, p.name in as_tensor))
        overload = "_".join(f"{name}_tensor" for name in choices if name in as_tensor)
        yield overload, f"({', '.join(args)}) -> Tensor"


def _class_index_kernel(fn):
    """fn as an op's kernel: what TorchScript cannot return is refused with a message that says so."""
    def kernel(*args, **kwargs):
        if kwargs.get("return_stats"):
            raise ValueError(f"{fn.__name__}(return_stats=True) is not available under TorchScript: the statistics "
                             f"are a Python object (LossStatistics); call {fn.__name__} from Python (eager or "
                             f"torch.compile) for them")
        if fn is F.multilevel_focal_loss and kwargs.get("reduction") == "none":
            raise ValueError("multilevel_focal_loss(reduction='none') is not available under TorchScript: it returns "
                             "a list of per-level losses where 'sum' returns a tensor; use reduction='sum', or "
                             "focal_loss(reduction='none') on the concatenated (N, M, C) logits")
        return fn(*args, **kwargs)

    return kernel


def _register(fn, kernel) -> None:
    name = f"api_{fn.__name__}"
    for overload, schema in _schemas(fn):
        qualified = f"{name}.{overload}" if overload else name
        _LIB.define(qualified + schema)
        # CompositeImplicitAutograd: the kernel runs above autograd, so the loss ops it calls record their own
        # backward, as in eager code.
        _LIB.impl(qualified, kernel, "CompositeImplicitAutograd")
    if _register_builtin is not None:
        _register_builtin(fn, f"focal_triton::{name}")


for _fn in (F.sigmoid_focal_loss, F.sigmoid_focal_loss_star, F.quality_focal_loss, F.varifocal_loss,
            F.focal_matching_cost):
    _register(_fn, _fn)
for _fn in (F.focal_loss, F.multilevel_focal_loss):
    _register(_fn, _class_index_kernel(_fn))
