"""Adapters that put focal_triton into existing detectors (one module per framework, imported on demand)."""
