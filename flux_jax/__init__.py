"""flux-jax: FLUX.1 in pure JAX/Flax, loading the PyTorch weights you already have."""
from .config import DEV, FILL, KONTEXT, SCHNELL, FluxConfig
from .pipeline import FluxPipeline, FluxPipelineOutput, PipelineError
from .img2img import FluxImg2ImgPipeline
from .inpaint import FluxFillPipeline, FluxInpaintPipeline
from .kontext import FluxKontextPipeline

__all__ = ["FluxPipeline", "FluxPipelineOutput", "PipelineError", "FluxConfig", "DEV", "SCHNELL", "KONTEXT", "FILL",
           "FluxKontextPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline"]
__version__ = "0.1.0"
