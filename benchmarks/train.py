"""One training step: flux-jax's Trainer vs diffusers + torch.optim.AdamW, on the same weights, in one run.

    python benchmarks/train.py                  # CPU default: real width, 1 double + 2 single blocks, fp32,
                                                # 256² and 512², batch 1, 512 text tokens; full AdamW + LoRA r16
    python benchmarks/train.py --gpu            # FLUX.1-dev size (19 + 38 blocks), bf16, random weights made on
                                                # the device (JAX only), 1024² and Kontext, LoRA r16, remat dots/full
    python benchmarks/train.py --gpu --depth 1 --single 1 --hidden 256 --sizes 256 --txt 64 --repeats 2
                                                # the --gpu code path on CPU with tiny sizes (times meaningless)

Prints a table: median seconds per optimizer step after warm-up, images/s, TFLOP/s, the JAX compile
time (tracing + lowering + XLA compilation of the first step, from jax.monitoring), JAX/torch and the
goal, the 1-minute load average around each measurement (os.getloadavg()), and on CPU the first
step's loss and gradient norm of both frameworks as a sanity check that both ran the same function.

What one step is, in both frameworks:
  x_σ = (1 − σ)·x0 + σ·ε on the packed tokens, target ε − x0, MSE over all tokens (loss.flow_loss,
  σ from LossConfig's default flux_shift sampler, guidance input 1.0), backward, global-norm clipping at
  1.0, AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 1e-4) on the float32 master weights.
  - JAX: flux_jax.train.trainer.Trainer (one jitted, state-donating step: draws ε and σ itself).
  - torch: FluxTransformer2DModel (weights converted from it into ours), zero_grad(set_to_none) / forward /
    mse_loss / backward / clip_grad_norm_ / step, torch.optim.AdamW with its defaults otherwise (on CPU
    the for-loop implementation, what diffusers' training scripts get). Its first step uses the very ε and
    σ that the Trainer draws for its first step, so the two first-step losses must agree to fp32 rounding.
  - Full fine-tuning trains every parameter. LoRA rank 16, alpha 16: ours on DEFAULT_TARGETS (attention
    qkv/proj, both MLPs, single linear1/linear2; a fused layer's LoRA shares its `a`), torch with peft
    `add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=[to_q, to_k, to_v, to_out.0, add_q_proj,
    add_k_proj, add_v_proj, to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2,
    proj_mlp, proj_out]))` on a frozen base, only LoRA params in the optimizer. The list is passed as a
    regex needing a parent module, so `proj_out` is the single blocks' and not the model's final 3072→64
    projection (which ours does not adapt): the same layers are adapted; trainable counts are printed.
    Their first-step gradient norms differ (PEFT gives q, k, v separate A's, and the random A's differ).

FLOPs convention (`flops()` of benchmarks/transformer.py = forward matmul FLOPs, projections + attention):
  model FLOPs of a step = 3 × forward (forward, activation grads, weight grads), for LoRA too: its
  activation grads still flow through every layer, and the saved weight-grad third is counted anyway
  (real work ≈ 2× forward), so LoRA TFLOP/s read as "model FLOPs per second", comparable across modes.
  Hardware FLOPs add the recomputation: remat "full" ≈ 4 × forward, "dots" ≈ 3 × forward + attention.
  MFU = model FLOPs / s / --peak-tflops (default 989 = H100 SXM bf16 dense on --gpu; none on CPU).

--gpu: JAX only (no torch), numbers need a GPU (one H100: goal ≤ 0.45 s/step for 1024² LoRA r16).
Each case runs in its own subprocess so `peak_bytes_in_use` (jax.devices()[0].memory_stats()) is that
case's own peak; a case that runs out of memory is reported as OOM. Cases: 1024² (4096 image + 512 text
tokens) and Kontext (the condition's 4096 tokens appended: 8192 image + 512 text = 8,704 tokens), each
with remat "dots" and "full". Blocks are unrolled like the pipeline's default on GPU (`--layers scan`
to compare).

The CPU here is small and shared (2 cores; other jobs may be running): the load average is printed,
and timings vary by ±10% or more between runs. torch uses os.cpu_count() threads, XLA its defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transformer import flops  # noqa: E402  (forward matmul FLOPs; same definition as the forward benchmark)

PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"]
LR, BETAS, EPS, WD, CLIP = 1e-4, (0.9, 0.999), 1e-8, 1e-4, 1.0
# The list above as one regex (PEFT full-matches a string) that needs a parent module: the blocks' proj_out
# but not the model's final proj_out, which the list alone would also adapt and ours does not.
PEFT_REGEX = r".*\.(" + "|".join(t.replace(".", r"\.") for t in PEFT_TARGETS) + ")$"
SEED = 0
GOAL_RATIO = 0.8  # CPU: JAX step time ≤ 0.8 × torch's
GOAL_GPU_S = 0.45  # GPU: 1024² LoRA r16 step on one H100
RESULT = "RESULT "  # prefix of a --case subprocess's JSON line


def attention_flops(depth: int, single: int, hidden: int, tokens: int, batch: int) -> float:
    return batch * (depth + single) * 4 * tokens * tokens * hidden


def train_flops(fwd: float, attn: float, remat: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one step from the forward's matmul FLOPs (see the docstring)."""
    model = 3 * fwd
    return model, model + {"none": 0.0, "dots": attn, "full": fwd}[remat]


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling (jax.monitoring events) while active."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax

        self.total, self.on = 0.0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if self.on and event in self.EVENTS:
            self.total += duration

    def __enter__(self):
        self.total, self.on = 0.0, True
        return self

    def __exit__(self, *exc):
        self.on = False


def load() -> float:
    return os.getloadavg()[0]


def timed_steps(step, warmup: int, repeats: int) -> tuple[float, object, float, float]:
    """Run `step` (which returns after its work is done) max(warmup, 1) + repeats times: (median s of the
    last `repeats`, the first call's result, the first call's s, load average over the timed calls)."""
    t0 = time.perf_counter()
    first = step()
    t_first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    l0, times = load(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first, t_first, (l0 + load()) / 2


# ---------------------------------------------------------------------------------------------- JAX side
def trainer_noise(seed: int, step: int, latents_shape, loss_cfg):
    """The ε and σ that Trainer's step number `step` draws (grad_accum 1): as in Trainer._train_step."""
    import jax

    from flux_jax.train.loss import draw

    key = jax.random.fold_in(jax.random.wrap_key_data(jax.random.key_data(jax.random.PRNGKey(seed))), step)
    noise, sigmas = draw(jax.random.split(key, 1)[0], latents_shape, loss_cfg)
    return np.asarray(noise), np.asarray(sigmas)


def lora_variables(params, cfg, rank):
    from flux_jax.train.lora import DEFAULT_TARGETS, init_lora

    return init_lora(params, cfg, rank, float(rank), DEFAULT_TARGETS, SEED)


def run_jax(cfg, params, batch: dict, lora_rank, remat: str, dtype, warmup: int, repeats: int, clock) -> dict:
    """Median step time etc. of our Trainer; params in cfg's layout (numpy or on the device)."""
    import jax

    from flux_jax.train.loss import LossConfig
    from flux_jax.train.trainer import OptimConfig, Trainer

    lora = lora_variables(params, cfg, lora_rank) if lora_rank else None
    optim = OptimConfig(learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD,
                        max_grad_norm=CLIP, remat=remat)
    trainer = Trainer(cfg, optim, LossConfig(), total_steps=1000, dtype=dtype, lora=lora)
    state, frozen = trainer.init(params, SEED)
    del lora
    n_train = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(state["trainable"]))
    dev_batch = trainer.put_batch(batch)
    box = {"state": state}
    del state

    def step():
        box["state"], m = trainer.step(box["state"], frozen, dev_batch)
        jax.block_until_ready((box["state"], m))
        return m

    with clock:  # counts only compilations: the first step's (and any later one's, which should not happen)
        t, m, t_first, ld = timed_steps(step, warmup, repeats)
    first = {k: float(v) for k, v in m.items()}
    out = {"s": t, "compile": clock.total, "first_s": t_first, "loss": first["loss"],
           "grad_norm": first["grad_norm"], "trainable": n_train, "load": ld}
    del box, frozen, trainer, dev_batch
    gc.collect()
    return out


# -------------------------------------------------------------------------------------------- torch side
def build_torch(cfg):
    """diffusers' transformer with `cfg`'s architecture, the same weights each call (seeded init), fp32."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    return FluxTransformer2DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        pooled_projection_dim=cfg.vec_in_dim, guidance_embeds=cfg.guidance_embed,
        axes_dims_rope=cfg.axes_dim).float().train()


def run_torch(model, inputs: dict, lora_rank, warmup: int, repeats: int) -> dict:
    """inputs: numpy x0 / eps (packed tokens), sigma, txt, y, img_ids, txt_ids. First step: the Trainer's ε, σ."""
    import torch

    if lora_rank:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights=True,
                                     target_modules=PEFT_REGEX))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    t = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}  # writable copies
    s = t["sigma"][:, None, None]
    guidance = torch.ones(t["x0"].shape[0]) if model.config.guidance_embeds else None

    def step():
        opt.zero_grad(set_to_none=True)
        x_sigma = (1 - s) * t["x0"] + s * t["eps"]
        pred = model(hidden_states=x_sigma, encoder_hidden_states=t["txt"], pooled_projections=t["y"],
                     timestep=t["sigma"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=guidance,
                     return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), t["eps"] - t["x0"])
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        return loss.item(), gn.item()

    t_med, (loss, gn), t_first, ld = timed_steps(step, warmup, repeats)
    out = {"s": t_med, "first_s": t_first, "loss": loss, "grad_norm": gn,
           "trainable": sum(p.numel() for p in trainable), "load": ld}
    del opt, trainable
    return out


# ---------------------------------------------------------------------------------------------- CPU mode
def cpu_main(args) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from convert.core import DictReader, convert
    from convert.transformer import diffusers_rules
    from flux_jax.config import DEV, PIXELS_PER_TOKEN
    from flux_jax.model import param_shapes, unstack_layers
    from flux_jax.pipeline import default_scan_layers
    from flux_jax.sampling import image_ids, pack, text_ids
    from flux_jax.train.loss import LossConfig

    torch.set_num_threads(args.threads)
    depth, single = args.depth or 1, args.single or 2
    cfg = model_config(DEV, args, depth, single)
    scan = default_scan_layers() if args.layers is None else args.layers == "scan"
    sizes, n_txt = args.sizes or [256, 512], args.txt or 512
    modes = [m for m in args.modes]
    print(f"config: {depth} double + {single} single blocks, width {cfg.hidden_size} ({cfg.num_heads} heads), "
          f"{n_txt} text tokens, batch {args.batch}, fp32, {'scanned' if scan else 'unrolled'} blocks, "
          f"remat {args.remat}; jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); {os.cpu_count()} CPUs, load average {load():.2f}")

    t0 = time.perf_counter()
    ref = build_torch(cfg)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    params = convert(DictReader(sd), diffusers_rules(cfg), param_shapes(cfg))
    del sd
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    if not scan:
        params = jax.tree_util.tree_map(np.asarray, unstack_layers(params))
    cfg = cfg.replace(scan_layers=scan)
    print(f"weights ready in {time.perf_counter() - t0:.1f} s "
          f"({sum(a.size for a in jax.tree_util.tree_leaves(params)) / 1e6:.0f} M params)")

    clock = CompileClock()
    rows = []
    for side in sizes:
        h = w = side // PIXELS_PER_TOKEN  # packed tokens a side; latents are 2h × 2w × 16
        rng = np.random.default_rng(side)
        latents = rng.standard_normal((args.batch, 2 * h, 2 * w, 16), np.float32)
        batch = {"latents": latents, "txt": rng.standard_normal((args.batch, n_txt, cfg.context_in_dim), np.float32),
                 "y": rng.standard_normal((args.batch, cfg.vec_in_dim), np.float32)}
        noise, sigmas = trainer_noise(SEED, 0, latents.shape, LossConfig())
        tinputs = {"x0": np.asarray(pack(jnp.asarray(latents))), "eps": np.asarray(pack(jnp.asarray(noise))),
                   "sigma": sigmas, "txt": batch["txt"], "y": batch["y"],
                   "img_ids": np.asarray(image_ids(h, w)), "txt_ids": np.asarray(text_ids(n_txt))}
        fwd = flops(depth, single, cfg.hidden_size, cfg.mlp_ratio, n_txt, h * w, args.batch)
        attn = attention_flops(depth, single, cfg.hidden_size, n_txt + h * w, args.batch)
        for mode in modes:
            rank = args.lora_rank if mode == "lora" else None
            name = "full AdamW" if mode == "full" else f"LoRA r{rank}"
            if ref is None:
                ref = build_torch(cfg)
            print(f"{side}² {name}: torch ...", flush=True)
            tr = run_torch(ref, tinputs, rank, args.warmup, args.repeats)
            ref = None  # its weights were trained (or it carries an adapter): a fresh copy for the next case
            gc.collect()
            print(f"  torch {tr['s']:.3f} s/step; jax ...", flush=True)
            jr = run_jax(cfg, params, batch, rank, args.remat, jnp.float32, args.warmup, args.repeats, clock)
            gc.collect()
            print(f"  jax {jr['s']:.3f} s/step (compile {jr['compile']:.1f} s)", flush=True)
            model_f, hw_f = train_flops(fwd, attn, args.remat)
            rows.append({"image": f"{side}²", "tokens": n_txt + h * w, "mode": name, "torch": tr, "jax": jr,
                         "model_tflop": model_f / 1e12, "hw_tflop": hw_f / 1e12})
            print_cpu_table(rows[-1:], args.batch)

    print(f"\nload average at the end: {load():.2f}")
    print_cpu_table(rows, args.batch)


def print_cpu_table(rows, batch) -> None:
    head = (f"{'image':>6} {'tokens':>6} {'mode':>11} {'torch s':>8} {'jax s':>8} {'jax/torch':>9} {'goal≤0.8':>8} "
            f"{'compile s':>9} {'torch img/s':>11} {'jax img/s':>9} {'torch TF/s':>10} {'jax TF/s':>8} "
            f"{'torch loss':>10} {'jax loss':>10} {'torch |g|':>9} {'jax |g|':>9} {'trainable t/j':>15} {'load':>5}")
    print("\n" + head)
    for r in rows:
        t, j = r["torch"], r["jax"]
        ratio = j["s"] / t["s"]
        print(f"{r['image']:>6} {r['tokens']:>6} {r['mode']:>11} {t['s']:>8.3f} {j['s']:>8.3f} {ratio:>9.2f} "
              f"{'met' if ratio <= GOAL_RATIO else 'no':>8} {j['compile']:>9.1f} {batch / t['s']:>11.3f} "
              f"{batch / j['s']:>9.3f} {r['model_tflop'] / t['s']:>10.3f} {r['model_tflop'] / j['s']:>8.3f} "
              f"{t['loss']:>10.6f} {j['loss']:>10.6f} {t['grad_norm']:>9.4f} {j['grad_norm']:>9.4f} "
              f"{t['trainable'] / 1e6:>6.1f}/{j['trainable'] / 1e6:<6.1f}M "
              f"{(t['load'] + j['load']) / 2:>5.1f}")


# ---------------------------------------------------------------------------------------------- GPU mode
def model_config(base, args, depth, single):
    cfg = base.replace(depth=depth, depth_single_blocks=single)
    if args.hidden:
        cfg = cfg.replace(hidden_size=args.hidden, num_heads=max(args.hidden // cfg.head_dim, 1))
    return cfg


def gpu_cases(args) -> list[dict]:
    sides = args.sizes or [1024]
    return [{"side": side, "kontext": kontext, "remat": remat}
            for side in sides for kontext in (False, True) for remat in args.remats]


def gpu_case(args, case: dict) -> dict:
    """One LoRA training case on the device with random bf16 weights: s/step, compile, peak memory."""
    import jax
    import jax.numpy as jnp

    from flux_jax.config import DEV, PIXELS_PER_TOKEN
    from flux_jax.model import param_shapes

    depth, single = args.depth or 19, args.single or 38
    cfg = model_config(DEV, args, depth, single).replace(scan_layers=args.layers == "scan")
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    shapes = param_shapes(cfg, dtype)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(SEED), len(leaves))
    init = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                   static_argnums=1)
    params = jax.tree_util.tree_unflatten(treedef, [init(k, s.shape) for k, s in zip(keys, leaves)])
    jax.block_until_ready(params)

    n_txt = args.txt or 512
    h = w = case["side"] // PIXELS_PER_TOKEN
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((args.batch, 2 * h, 2 * w, 16), np.float32)
    batch = {"latents": latents, "txt": rng.standard_normal((args.batch, n_txt, cfg.context_in_dim), np.float32),
             "y": rng.standard_normal((args.batch, cfg.vec_in_dim), np.float32)}
    n_img = h * w
    if case["kontext"]:
        batch["control"] = rng.standard_normal(latents.shape, np.float32)
        n_img *= 2
    fwd = flops(depth, single, cfg.hidden_size, cfg.mlp_ratio, n_txt, n_img, args.batch)
    attn = attention_flops(depth, single, cfg.hidden_size, n_txt + n_img, args.batch)
    model_f, hw_f = train_flops(fwd, attn, case["remat"])
    out = {**case, "tokens": n_txt + n_img, "model_tflop": model_f / 1e12, "hw_tflop": hw_f / 1e12,
           "device": jax.devices()[0].device_kind, "params_gb": sum(a.nbytes for a in jax.tree_util.tree_leaves(params)) / 1e9}
    try:
        r = run_jax(cfg, params, batch, args.lora_rank, case["remat"], dtype, args.warmup, args.repeats,
                    CompileClock())
        out.update(r)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError RESOURCE_EXHAUSTED: report and go on)
        text = str(e)
        out["error"] = "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else \
            f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
    stats = jax.devices()[0].memory_stats() or {}
    out["peak_gb"] = stats.get("peak_bytes_in_use", float("nan")) / 1e9
    out["limit_gb"] = stats.get("bytes_limit", float("nan")) / 1e9
    return out


def gpu_main(args, argv) -> None:
    import jax

    depth, single = args.depth or 19, args.single or 38
    print(f"config: {depth} double + {single} single blocks, width {args.hidden or 3072}, {args.txt or 512} text "
          f"tokens, batch {args.batch}, {args.dtype}, {args.layers} blocks, LoRA r{args.lora_rank} + AdamW; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; load average {load():.2f}", flush=True)
    rows = []
    for case in gpu_cases(args):
        label = f"{case['side']}²{' Kontext' if case['kontext'] else ''} remat {case['remat']}"
        print(f"{label} ...", flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--case", json.dumps(case)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
        if proc.returncode or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            row = {**case, "error": f"exit {proc.returncode}: " + " | ".join(tail)[-300:]}
        else:
            row = json.loads(lines[-1][len(RESULT):])
        rows.append(row)
        print(f"  {json.dumps(row)}", flush=True)
    print_gpu_table(rows, args)


def print_gpu_table(rows, args) -> None:
    peak = args.peak_tflops
    print(f"\n{'image':>6} {'kontext':>7} {'tokens':>6} {'remat':>5} {'s/step':>8} {'goal':>9} {'img/s':>7} "
          f"{'model TF/s':>10} {'hw TF/s':>8} {'MFU':>6} {'compile s':>9} {'peak GB':>8} {'loss':>9}")
    for r in rows:
        if "s" not in r:
            print(f"{r['side']:>5}² {str(r['kontext']):>7} {r.get('tokens', ''):>6} {r['remat']:>5} "
                  f"{r.get('error', 'failed')}  (peak {r.get('peak_gb', float('nan')):.1f} GB)")
            continue
        goal = "" if r["kontext"] or r["side"] != 1024 else ("met" if r["s"] <= GOAL_GPU_S else "no") + "≤0.45"
        mfu = f"{r['model_tflop'] / r['s'] / peak:.1%}" if peak else "-"
        print(f"{r['side']:>5}² {str(r['kontext']):>7} {r['tokens']:>6} {r['remat']:>5} {r['s']:>8.4f} {goal:>9} "
              f"{args.batch / r['s']:>7.2f} {r['model_tflop'] / r['s']:>10.1f} {r['hw_tflop'] / r['s']:>8.1f} "
              f"{mfu:>6} {r['compile']:>9.1f} {r['peak_gb']:>8.2f} {r['loss']:>9.5f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="full model, bf16, LoRA, 1024² + Kontext, JAX only")
    ap.add_argument("--depth", type=int, help="double blocks (CPU default 1, GPU 19)")
    ap.add_argument("--single", type=int, help="single blocks (CPU default 2, GPU 38)")
    ap.add_argument("--hidden", type=int, help="width (default 3072; heads = width / 128); for tiny test runs")
    ap.add_argument("--sizes", type=int, nargs="+", help="image sides in pixels (CPU default 256 512, GPU 1024)")
    ap.add_argument("--txt", type=int, help="text tokens (default 512)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"],
                    help="CPU: what is trained (full fine-tuning, LoRA)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--remat", choices=["none", "dots", "full"], default="none", help="CPU: JAX remat policy")
    ap.add_argument("--remats", nargs="+", choices=["none", "dots", "full"], default=["dots", "full"],
                    help="GPU: remat policies to compare")
    ap.add_argument("--layers", choices=["scan", "unrolled"],
                    help="block layout (default: the pipeline's, default_scan_layers(); unrolled on CPU and GPU)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="GPU compute dtype")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first one compiles)")
    ap.add_argument("--repeats", type=int, help="timed steps (CPU default 3, GPU 10)")
    ap.add_argument("--peak-tflops", type=float, help="for MFU (GPU default 989: H100 SXM bf16 dense)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for torch")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one --gpu case as JSON, in a subprocess
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 10 if args.gpu else 3
    if args.gpu:
        args.layers = args.layers or "unrolled"
        if args.peak_tflops is None and not args.hidden:
            args.peak_tflops = 989.0
        if args.case:
            print(RESULT + json.dumps(gpu_case(args, json.loads(args.case))), flush=True)
        else:
            gpu_main(args, sys.argv[1:])
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
