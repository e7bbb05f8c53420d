"""Restore test: can a trained run bring back real tiles' fine structure from a little noise?

Real val tiles are noised to a low timestep t and brought back to t = 0 by DDPM's own ancestral steps (the
run's noise schedule, every step). A model whose denoiser keeps thin oriented structure returns tiles with
the originals' orientation coherence (fadscale.core.metrics.orientation_coherence: stroma's fibres score high,
isotropic mottle low); one that does not returns mottle, whatever its generation accuracy. It isolates the
low-noise end of the model from the layout decisions of full sampling, in seconds rather than a training run.

    python tools/diag_restore.py demo-out/vanilla --shards demo-out/shards --out restore.png --threads 2

Prints, per class, the originals' coherence and the restored tiles' at each t, then one JSON line; writes a
sheet (per class: the originals, then the tiles restored from each t) when --out is given. Pixel-space runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fadscale.core.evaluation.inputs import load_real_tiles  # noqa: E402
from fadscale.core.metrics import orientation_coherence  # noqa: E402
from fadscale.core.models.unet import uses_class_labels  # noqa: E402
from fadscale.artifacts.run import load_run  # noqa: E402
from fadscale.core.sampling import make_scheduler, to_uint8  # noqa: E402


@torch.no_grad()
def restore(loaded, clean: torch.Tensor, labels: torch.Tensor, start: int, seed: int) -> torch.Tensor:
    """Noise `clean` ([-1, 1]) to timestep `start`, then run DDPM's ancestral steps start..0."""
    scheduler = make_scheduler("ddpm", dict(loaded.card["noise"]))
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    generator = torch.Generator().manual_seed(seed)
    t0 = torch.full((len(clean),), start, dtype=torch.long)
    x = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), t0)
    tokens = loaded.table[labels]
    class_labels = labels if uses_class_labels(loaded.unet) else None
    for t in scheduler.timesteps[scheduler.timesteps <= start]:
        out = loaded.unet(x, t, tokens, class_labels=class_labels).sample.float()
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


def sheet(rows: list[torch.Tensor], per_class: int, classes: int, path: Path, zoom: int = 3) -> None:
    """Per class: one row of originals, then one per restore level; `rows` are uint8 [N, C, S, S] sets."""
    from PIL import Image

    size, gap = rows[0].shape[-1] * zoom, 2 * zoom
    canvas = Image.new("L", (per_class * (size + gap), classes * len(rows) * (size + gap)), 255)
    for r, tiles in enumerate(rows):
        for i, tile in enumerate(tiles):
            c, j = divmod(i, per_class)
            image = Image.fromarray(tile.float().mean(0).round().byte().numpy()).resize((size, size), Image.NEAREST)
            canvas.paste(image, (j * (size + gap), (c * len(rows) + r) * (size + gap)))
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained run folder (its final/ is used)")
    parser.add_argument("--shards", required=True, help="the shard folder whose val tiles are restored")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--t", type=int, nargs="+", default=[25, 50, 100], help="noise levels to restore from")
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the sheet here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_run(args.run, weights=args.weights)
    if loaded.card["space"] != "pixel":
        raise SystemExit(f"{args.run}: a {loaded.card['space']}-space run; the restore test is for pixel runs")
    classes, size, channels = loaded.card["classes"], loaded.card["sample_size"], loaded.card["channels"]
    real = load_real_tiles(Path(args.shards), classes, split="val", image_size=size, channels=channels,
                           max_per_class=args.per_class)
    short = [name for name in classes if len(real[name]) < args.per_class]
    if short:
        raise SystemExit(f"--shards {args.shards}: fewer than {args.per_class} val tiles for {', '.join(short)}")
    originals = torch.cat([real[name] for name in classes])
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    clean = originals.float() / 127.5 - 1

    rows, result = [originals], {name: {"original": orientation_coherence(real[name])} for name in classes}
    for start in args.t:
        restored = to_uint8(restore(loaded, clean, labels, start, args.seed))
        rows.append(restored)
        for c, name in enumerate(classes):
            result[name][f"t{start}"] = orientation_coherence(restored[labels == c])
    print("orientation coherence (1: all edges one way): class | original | " +
          " | ".join(f"restored from t={t}" for t in args.t))
    for name in classes:
        print(f"  {name:10s} {result[name]['original']:.3f}  " +
              "  ".join(f"{result[name][f't{t}']:.3f}" for t in args.t))
    if args.out:
        sheet(rows, args.per_class, len(classes), args.out)
        print(f"wrote {args.out}")
    print(json.dumps({"diag": "restore", "run": str(args.run), "t": args.t, "orientation": result}))


if __name__ == "__main__":
    main()
