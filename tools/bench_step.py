"""Benchmark the training step: the reference's step vs vanilla vs FAD with the cache, side by side.

    python tools/bench_step.py                       # tiny-sd, 64x64 grayscale, batch 4 and 8, CPU
    python tools/bench_step.py --preset cpu-small --size 32 --batches 4 --reps 3   # quick
    python tools/bench_step.py --batches 4 64        # on a GPU: adds images/s and MFU

Arms (each fp32 and bf16 autocast, with and without gradient checkpointing):
- reference: what the seed does every step: the CLIP text tower on the class prompts and the ResNet50
  expert (1 channel, 224x224) on the *noisy* input, then the UNet + alignment; fp32 in the seed.
- vanilla: the UNet alone (plain fine-tuning), conditioning tokens from the cache.
- fad: the UNet + alignment against a cached expert feature (no expert, no text encoder in the step).
Each arm runs in its own process (clean peak memory): median seconds/step over --reps timed steps after
one warm-up step. The last line printed is one JSON object with every number and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

LAYER = "down_blocks.2.resnets.0.conv_shortcut"


def build_arm(arm: str, preset: str, size: int, batch: int, checkpointing: bool, device: torch.device):
    from fadscale.align import build_projector
    from fadscale.conditioning import ClassConditioning
    from fadscale.models.expert import Expert
    from fadscale.models.unet import build_unet, probe_feature_shape
    from fadscale.train_fad import FadModel

    torch.manual_seed(0)
    unet = build_unet(preset, 1, size)
    dim = unet.config.cross_attention_dim
    projector = None
    if arm != "vanilla":
        projector = build_projector("seed", 2048, probe_feature_shape(unet, LAYER, 1, size), 512, LAYER)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    model = FadModel(unet, ClassConditioning(8, dim), projector, LAYER).to(device).train()
    extras = {}
    if arm == "reference":
        from transformers import CLIPTextConfig, CLIPTextModel

        # CLIP ViT-L/14's text tower (SD 1.5's), random weights: the timing is what matters here.
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768)).to(device).eval()
        expert = Expert("resnet50", 8, 1, 224).to(device).eval()
        extras = {"text": text, "expert": expert}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if device.type == "cuda" else {}))
    return model, optimizer, extras


def one_step(arm, model, optimizer, extras, batch, size, precision, device):
    import torch.nn.functional as F

    from fadscale.models.expert import expert_input

    noisy = torch.randn(batch, 1, size, size, device=device)
    noise = torch.randn_like(noisy)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    labels = torch.randint(0, 8, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        target = None
        if arm == "reference":
            with torch.no_grad():
                ids = torch.randint(0, 49408, (batch, 77), device=device)
                extras["text"](input_ids=ids)  # the seed encodes the prompts every step
                card = {"input_size": 224, "in_chans": 1, "normalization": {"mean": [0.5], "std": [0.5]}}
                target = extras["expert"].features(expert_input(noisy, card))
        elif arm == "fad":
            target = torch.randn(batch, 2048, device=device)  # read from the cache in training
        prediction, align_loss, _ = model(noisy, timesteps, labels, None, target)
        loss = F.mse_loss(prediction.float(), noise)
        if align_loss is not None:
            loss = loss + align_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(arm, model, optimizer, extras, batch, size, precision, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step(arm, model, optimizer, extras, batch, size, precision, device)
    return float(counter.get_total_flops())


def measure(spec: dict) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, optimizer, extras = build_arm(spec["arm"], spec["preset"], spec["size"], spec["batch"], spec["ckpt"], device)
    args = (spec["arm"], model, optimizer, extras, spec["batch"], spec["size"], spec["precision"], device)
    one_step(*args)  # warm-up (allocator, kernels, lazy init)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        one_step(*args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {**spec, "s_per_step": statistics.median(times), "times": times, "device": device.type}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["flops_per_step"] = step_flops(*args)
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result["images_per_s"] = spec["batch"] / result["s_per_step"]
    return result


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-sd")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--arms", nargs="+", default=["reference", "vanilla", "fad"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--ckpt", nargs="+", default=["off", "on"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return

    results = []
    for batch in args.batches:
        for precision in args.precisions:
            for ckpt in args.ckpt:
                for arm in args.arms:
                    spec = dict(arm=arm, preset=args.preset, size=args.size, batch=batch, precision=precision,
                                ckpt=ckpt == "on", reps=args.reps)
                    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True,
                                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                    if proc.returncode != 0:
                        print(proc.stderr[-2000:], file=sys.stderr)
                        raise SystemExit(f"arm {spec} failed")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    results.append(result)
                    print(f"batch {batch:3d} {precision:4s} ckpt {ckpt:3s} {arm:9s} "
                          f"{result['s_per_step']:8.3f} s/step  {result['images_per_s']:8.1f} img/s  "
                          f"peak {result['peak_gib']:6.2f} GiB", flush=True)

    def find(arm, batch, precision, ckpt):
        for r in results:
            if (r["arm"], r["batch"], r["precision"], r["ckpt"]) == (arm, batch, precision, ckpt):
                return r
        return None

    ratios = {}
    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if gpu_name and k in gpu_name), None)
    for batch in args.batches:
        for ckpt in (False, True):
            for precision in args.precisions:
                fad, vanilla = find("fad", batch, precision, ckpt), find("vanilla", batch, precision, ckpt)
                if fad and vanilla:
                    ratios[f"fad_over_vanilla/b{batch}/{precision}/ckpt_{'on' if ckpt else 'off'}"] = \
                        fad["s_per_step"] / vanilla["s_per_step"]
            reference, fad_bf16 = find("reference", batch, "fp32", ckpt), find("fad", batch, "bf16", ckpt)
            if reference and fad_bf16:
                ratios[f"reference_fp32_over_fad_bf16/b{batch}/ckpt_{'on' if ckpt else 'off'}"] = \
                    reference["s_per_step"] / fad_bf16["s_per_step"]
    if peak:
        for r in results:
            if "flops_per_step" in r:
                r["mfu"] = r["flops_per_step"] / r["s_per_step"] / (peak * 1e12)
    print()
    for key, value in ratios.items():
        print(f"{key:55s} {value:6.2f}")
    summary = {"bench": "step", "preset": args.preset, "size": args.size, "device": gpu_name or "cpu",
               "torch_threads": torch.get_num_threads(), "ratios": ratios,
               "results": [{k: v for k, v in r.items() if k != "times"} for r in results]}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
