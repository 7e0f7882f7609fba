import os
import sys

# Shared helpers (torch_ref.py, ...) live beside this file; tests in subfolders import them too.
sys.path.insert(0, os.path.dirname(__file__))
# Parity is judged in float32: keep XLA's CPU matmuls at full precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
