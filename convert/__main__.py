"""python -m convert SRC DST [--dtype bf16] [--quantize int8]: convert PyTorch FLUX weights once, load them fast after."""
from __future__ import annotations

import argparse
import sys
import time

from flux_jax.quantize import MODES

from . import ConversionError, convert_to_checkpoint, detect


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    ap.add_argument("src", help="diffusers pipeline folder (model_index.json), one component folder "
                                "(transformer/, text_encoder/, text_encoder_2/, vae/), or a BFL .safetensors file")
    ap.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default=None, help="store params as this dtype (bf16, fp32, fp16); default: as the source")
    ap.add_argument("--quantize", choices=tuple(MODES),
                    help="save the transformer's and T5's block kernels quantized (loaded as saved)")
    ap.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        kind = detect(args.src)
        print(f"converting {kind} from {args.src}", file=sys.stderr)
        out = convert_to_checkpoint(args.src, args.dst, args.dtype, args.overwrite, args.quantize)
    except (ConversionError, FileExistsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
