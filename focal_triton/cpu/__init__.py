"""The pure-torch implementation (CPU, and any device torch runs on): `dense` and `multilevel` with the kernels'
contracts, on the shared elementwise math of `math`. Depends only on `focal_triton.losses`."""
