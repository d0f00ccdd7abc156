"""The registered ops, torch.ops.focal_triton.* (importing this package registers them): `dense` and
`multilevel`, each with its fake (meta) implementation and autograd, and `matching` (no gradient); `backend`
chooses the implementation."""
from . import dense, matching, multilevel  # noqa: F401
