"""The registered ops, torch.ops.focal_triton.* (importing this package registers them): `dense` and
`multilevel`, each with its fake (meta) implementation and autograd; `backend` chooses the implementation."""
from . import dense, multilevel  # noqa: F401
