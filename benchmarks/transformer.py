"""One transformer forward: flux-jax vs diffusers on the same config and the same weights, in one run.

    python benchmarks/transformer.py                      # CPU default: real width, 1+2 blocks, 256² and 512², fp32
    python benchmarks/transformer.py --gpu                # full 19+38 blocks, bf16, 1024², 512 text tokens
    python benchmarks/transformer.py --gpu --quantize none fp8 --attention cudnn tokamax   # the speed issue's table

Prints a table: median seconds per forward, JAX/torch ratio, JAX compile time, TFLOP/s, and the
relative L2 difference of the two outputs (a sanity check that both ran the same function). With
--quantize, a row per weight format (flux_jax/quantize.py: fp8 runs float8 matmuls on Ada/Hopper) and
its output's relative L2 difference from JAX's unquantized output.
With --breakdown, a profile of where each framework's time goes: every projection matmul of
the forward timed alone at its shape (jnp.dot vs torch.mm), the attention core alone (the one
layers.attention_impl picks vs torch's scaled_dot_product_attention) times the blocks, and the
rest (norms, RoPE, modulation, concatenations); and the time 0.8x torch's forward leaves.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def flops(depth: int, depth_single: int, hidden: int, mlp_ratio: float, n_txt: int, n_img: int, batch: int) -> float:
    """Matmul FLOPs of one forward (projections + attention); embedders and norms are negligible."""
    d, tokens = hidden, n_txt + n_img
    mlp = mlp_ratio * d
    double = 2 * tokens * (3 * d * d + d * d + 2 * d * mlp)  # qkv, proj, fc1 + fc2 (each stream's own tokens)
    single = 2 * tokens * (d * (3 * d + mlp) + (d + mlp) * d)  # linear1, linear2
    attn = 4 * tokens * tokens * d  # QK^T and AV
    return batch * (depth * (double + attn) + depth_single * (single + attn))


def matmul_shapes(depth: int, depth_single: int, cfg, n_txt: int, n_img: int) -> dict[tuple[int, int, int], int]:
    """{(M, K, N): count} of the forward's token-wise projections (the embedders' M = 1 GEMVs left out)."""
    d, mlp = cfg.hidden_size, int(cfg.hidden_size * cfg.mlp_ratio)
    shapes: dict[tuple[int, int, int], int] = {}
    add = lambda m, k, n, c=1: shapes.__setitem__((m, k, n), shapes.get((m, k, n), 0) + c)
    add(n_img, cfg.in_channels, d)  # img_in
    add(n_txt, cfg.context_in_dim, d)  # txt_in
    for m in (n_img, n_txt):  # the double blocks' two streams
        for k, n in ((d, 3 * d), (d, d), (d, mlp), (mlp, d)):
            add(m, k, n, depth)
    add(n_txt + n_img, d, 3 * d + mlp, depth_single)  # linear1
    add(n_txt + n_img, d + mlp, d, depth_single)  # linear2
    add(n_img, d, cfg.in_channels)  # final_layer
    return shapes


def breakdown(cfg, depth: int, depth_single: int, n_txt: int, n_img: int, repeats: int, jdtype, tdtype,
              tdev: str = "cpu") -> dict:
    """Seconds of the forward's matmuls and attention cores, each timed alone, in JAX and torch
    (torch on `tdev`, JAX on its default device)."""
    import jax
    import jax.numpy as jnp
    import torch

    from flux_jax.quantize import dot as model_dot

    rng = np.random.default_rng(0)
    tsync = (lambda o: torch.cuda.synchronize()) if tdev == "cuda" else (lambda o: None)
    out = {"jax matmuls": 0.0, "torch matmuls": 0.0}
    dot = jax.jit(model_dot)  # as layers.Linear multiplies (float32 accumulation for bf16 on CPU)
    for (m, k, n), count in matmul_shapes(depth, depth_single, cfg, n_txt, n_img).items():
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a, jdtype), jnp.asarray(b, jdtype)
        ta, tb = (torch.from_numpy(x).to(tdev, tdtype) for x in (a, b))
        dot(ja, jb).block_until_ready()
        out["jax matmuls"] += count * median_time(lambda: dot(ja, jb), repeats, lambda o: o.block_until_ready())
        with torch.inference_mode():
            torch.mm(ta, tb)
            out["torch matmuls"] += count * median_time(lambda: torch.mm(ta, tb), repeats, tsync)
    heads, head_dim, tokens = cfg.num_heads, cfg.hidden_size // cfg.num_heads, n_txt + n_img
    q, k, v = (rng.standard_normal((1, tokens, heads, head_dim), np.float32) for _ in range(3))
    from flux_jax.layers import dot_product_attention

    # a fresh trace, so the kernel is the one FLUX_JAX_ATTENTION picks now
    attend = jax.jit(lambda q, k, v: dot_product_attention(q, k, v))
    jq, jk, jv = (jnp.asarray(x, jdtype) for x in (q, k, v))
    attend(jq, jk, jv).block_until_ready()
    out["jax attention"] = (depth + depth_single) * median_time(lambda: attend(jq, jk, jv), repeats,
                                                                 lambda o: o.block_until_ready())
    tq, tk, tv = (torch.from_numpy(x).to(tdev, tdtype).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.inference_mode():
        sdpa(tq, tk, tv)
        out["torch attention"] = (depth + depth_single) * median_time(lambda: sdpa(tq, tk, tv), repeats, tsync)
    return out


def median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="full model, bf16, 1024², on the GPU")
    ap.add_argument("--depth", type=int, help="double blocks (CPU default 1, GPU 19)")
    ap.add_argument("--single", type=int, help="single blocks (CPU default 2, GPU 38)")
    ap.add_argument("--sizes", type=int, nargs="+", help="image sides in pixels (CPU default 256 512, GPU 1024)")
    ap.add_argument("--txt", type=int, help="text tokens (CPU default 128, GPU 512)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], help="CPU default fp32, GPU bf16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--attention", nargs="+", default=[""],
                    help="JAX attention kernels to compare (xla, cudnn); default: flux_jax's own choice")
    ap.add_argument("--quantize", nargs="+", default=["none"],
                    help="weight formats to compare: none and flux_jax.quantize modes (int8, int4, nf4, fp8)")
    ap.add_argument("--no-torch", action="store_true",
                    help="JAX only, random weights drawn on the device (fast; for tuning kernels and flags)")
    ap.add_argument("--no-scan", action="store_true",
                    help="unrolled blocks with per-layer params (FluxConfig.scan_layers=False)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the forward's matmuls and attention alone in both frameworks (a profile)")
    args = ap.parse_args()
    gpu = args.gpu
    depth = args.depth if args.depth is not None else (19 if gpu else 1)
    single = args.single if args.single is not None else (38 if gpu else 2)
    sizes = args.sizes or ([1024] if gpu else [256, 512])
    n_txt = args.txt or (512 if gpu else 128)
    dtype_name = args.dtype or ("bf16" if gpu else "fp32")

    import jax
    import jax.numpy as jnp
    import torch

    from convert.core import DictReader, convert
    from convert.transformer import diffusers_rules
    from flux_jax import quantize as qz
    from flux_jax.config import DEV, PIXELS_PER_TOKEN
    from flux_jax.model import Flux, param_shapes, unstack_layers
    from flux_jax.sampling import image_ids, text_ids

    torch.set_num_threads(args.threads)
    cfg = DEV.replace(depth=depth, depth_single_blocks=single)
    tdev = "cuda" if gpu else "cpu"
    tdtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    jdtype = jnp.bfloat16 if dtype_name == "bf16" else jnp.float32
    print(f"config: {depth} double + {single} single blocks, width {cfg.hidden_size}, {n_txt} text tokens, "
          f"{dtype_name}, jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {tdev}")

    t0 = time.perf_counter()
    if args.no_torch:
        shapes = param_shapes(cfg)
        keys = iter(jax.random.split(jax.random.PRNGKey(0), len(jax.tree_util.tree_leaves(shapes))))
        params = jax.tree_util.tree_map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, jdtype), shapes)
    else:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(0)
        with torch.device(tdev):
            ref = FluxTransformer2DModel(num_layers=depth, num_single_layers=single,
                                         guidance_embeds=True).to(tdtype).eval()
        sd = {k: v.detach().float().cpu().numpy() if v.dtype != torch.bfloat16 else
              v.detach().view(torch.int16).cpu().numpy().view(jnp.bfloat16) for k, v in ref.state_dict().items()}
        params = convert(DictReader(sd), diffusers_rules(cfg), param_shapes(cfg))
        del sd
        params = jax.device_put(jax.tree_util.tree_map(lambda p: jnp.asarray(p, jdtype), params))
    if args.no_scan:
        cfg = cfg.replace(scan_layers=False)
        params = unstack_layers(params)
    print(f"weights ready in {time.perf_counter() - t0:.1f} s")

    modes = [None if m == "none" else qz.check_mode(m) for m in args.quantize]
    weights = {m: qz.quantize_tree(params, "transformer", m) for m in modes}  # None: params as they are
    model = Flux(cfg, jdtype)
    rows, profiles = [], []
    for side in sizes:
        h = w = side // PIXELS_PER_TOKEN
        rng = np.random.default_rng(0)
        x = {"img": rng.standard_normal((1, h * w, cfg.in_channels), np.float32),
             "img_ids": image_ids(h, w), "txt": rng.standard_normal((1, n_txt, cfg.context_in_dim), np.float32),
             "txt_ids": text_ids(n_txt), "timesteps": np.array([0.7], np.float32),
             "y": rng.standard_normal((1, cfg.vec_in_dim), np.float32), "guidance": np.array([3.5], np.float32)}
        tx = {k: torch.from_numpy(v).to(tdev) for k, v in x.items()}
        for k in ("img", "txt", "y"):
            tx[k] = tx[k].to(tdtype)
        jx = {k: jnp.asarray(v, jdtype if k in ("img", "txt", "y") else jnp.float32) for k, v in x.items()}

        def torch_fwd():
            with torch.inference_mode():
                return ref(hidden_states=tx["img"], encoder_hidden_states=tx["txt"], pooled_projections=tx["y"],
                           timestep=tx["timesteps"], img_ids=tx["img_ids"], txt_ids=tx["txt_ids"],
                           guidance=tx["guidance"], return_dict=False)[0]

        tsync = (lambda out: torch.cuda.synchronize()) if gpu else (lambda out: None)
        if args.no_torch:
            t_torch, b = float("nan"), None
        else:
            out_t = torch_fwd()
            tsync(out_t)
            t_torch = median_time(torch_fwd, args.repeats, tsync)
            b = out_t.float().cpu().numpy().astype(np.float64)

        tf = flops(depth, single, cfg.hidden_size, cfg.mlp_ratio, n_txt, h * w, 1) / 1e12
        first = len(rows)  # this image's first row: the first kernel, unquantized (what the profile explains)
        for impl in args.attention:
            os.environ["FLUX_JAX_ATTENTION"] = impl  # read when tracing: a fresh jit per kernel
            plain = None  # this kernel's unquantized output, for the quantized rows' error
            for mode, p in weights.items():
                fwd = jax.jit(lambda p, x: model.apply({"params": p}, **x))
                t0 = time.perf_counter()
                compiled = fwd.lower(p, jx).compile()
                t_compile = time.perf_counter() - t0
                out_j = compiled(p, jx)
                out_j.block_until_ready()
                t_jax = median_time(lambda: compiled(p, jx), args.repeats, lambda out: out.block_until_ready())
                a = np.asarray(out_j, np.float64)
                diff = float("nan") if b is None else np.linalg.norm(a - b) / np.linalg.norm(b)
                plain = a if mode is None else plain
                vs_plain = float("nan") if plain is None or mode is None else \
                    np.linalg.norm(a - plain) / np.linalg.norm(plain)
                rows.append((f"{side}x{side}", impl or "auto", mode or dtype_name, h * w, t_torch, t_jax,
                             t_jax / t_torch, t_compile, tf / t_jax, tf / t_torch, diff, vs_plain))
        if args.breakdown and not args.no_torch:
            os.environ["FLUX_JAX_ATTENTION"] = args.attention[0]
            parts = breakdown(cfg, depth, single, n_txt, h * w, args.repeats, jdtype, tdtype, tdev)
            profiles.append((f"{side}x{side}", t_torch, rows[first][5], parts))

    print()
    print(f"{'image':>9} {'attn':>8} {'weights':>7} {'img tok':>7} {'torch s':>9} {'jax s':>9} {'jax/torch':>9} "
          f"{'compile s':>9} {'jax TF/s':>9} {'torch TF/s':>10} {'rel diff':>9} {'vs float':>9}")
    for r in rows:
        print(f"{r[0]:>9} {r[1]:>8} {r[2]:>7} {r[3]:>7} {r[4]:>9.4f} {r[5]:>9.4f} {r[6]:>9.2f} {r[7]:>9.1f} "
              f"{r[8]:>9.1f} {r[9]:>10.1f} {r[10]:>9.2e} {r[11]:>9.2e}")
    if profiles:
        print_breakdown(profiles)


def print_breakdown(profiles: list) -> None:
    """Where each framework's forward time goes, and what 0.8x torch's total would leave."""
    print("\n| image | framework | forward s | matmuls alone s | attention alone s | rest s | "
          "0.8x torch s | 0.8x torch - matmuls s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for image, t_torch, t_jax, parts in profiles:
        for name, total in (("torch", t_torch), ("jax", t_jax)):
            mm, att = parts[f"{name} matmuls"], parts[f"{name} attention"]
            print(f"| {image} | {name} | {total:.3f} | {mm:.3f} | {att:.3f} | {total - mm - att:.3f} | "
                  f"{0.8 * t_torch:.3f} | {0.8 * t_torch - mm:.3f} |")


if __name__ == "__main__":
    main()
