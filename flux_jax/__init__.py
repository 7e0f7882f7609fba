"""flux-jax: FLUX.1 in pure JAX/Flax, loading the PyTorch weights you already have."""
from .config import DEV, FILL, KONTEXT, SCHNELL, FluxConfig
from .pipeline import FluxPipeline, FluxPipelineOutput, PipelineError

__all__ = ["FluxPipeline", "FluxPipelineOutput", "PipelineError", "FluxConfig", "DEV", "SCHNELL", "KONTEXT", "FILL"]
__version__ = "0.1.0"
