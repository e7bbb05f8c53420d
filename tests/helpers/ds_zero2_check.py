"""DeepSpeed ZeRO-2 on CPU with OUR config (launch/deepspeed/zero2.json): a tiny diffusers UNet and a
client torch AdamW, trained a few steps on random data by 2 ranks.

Run: DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=/tmp/x python -m torch.distributed.run --nproc_per_node 2 \
         tests/helpers/ds_zero2_check.py [--config launch/deepspeed/zero2.json] [--steps 6] [--out result.json]

Checks (rank 0 prints one JSON line and writes --out): the loss decreased, and the weights are
identical on every rank (a checksum all-gathered). Exit code 0 when both hold.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(REPO / "launch" / "deepspeed" / "zero2.json"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--shm-op",
        action="store_true",
        help="build and use DeepSpeed's CPU shared-memory all-reduce op (a ~30 s to 2 min compile on first "
        "use); by default collectives go through plain gloo, which is what the config test needs",
    )
    args = parser.parse_args()

    import deepspeed

    if not args.shm_op:
        import importlib

        # (`import deepspeed.comm.torch as m` would give torch itself: deepspeed.comm has a `torch` attribute)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    config = json.loads(Path(args.config).read_text())
    # The "auto" values are filled by accelerate in real runs; here we fill them ourselves.
    config["train_micro_batch_size_per_gpu"] = args.micro_batch
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = 1.0
    config["train_batch_size"] = args.micro_batch * world
    stage = config["zero_optimization"]["stage"]
    bf16 = bool(config.get("bf16", {}).get("enabled", False))

    torch.manual_seed(0)  # same initial weights on every rank
    model = tiny_unet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    dtype = torch.bfloat16 if bf16 else torch.float32

    # A fixed batch per rank (different across ranks): the loss on it must go down.
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.micro_batch, 1, 16, 16, generator=gen)
    cond = torch.randn(args.micro_batch, 1, 32, generator=gen)
    t = torch.randint(0, 1000, (args.micro_batch,), generator=gen)
    target = torch.randn(args.micro_batch, 1, 16, 16, generator=gen)

    losses = []
    for _ in range(args.steps):
        pred = engine(x.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    with torch.no_grad():
        flat = torch.cat([p.detach().float().flatten() for p in engine.module.parameters()])
        checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum()]).double()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    identical = all(torch.equal(gathered[0], g) for g in gathered[1:])
    decreased = losses[-1] < losses[0]
    result = {
        "world_size": world,
        "zero_stage": stage,
        "engine_zero_stage": engine.zero_optimization_stage(),
        "engine_optimizer": type(engine.optimizer).__name__,
        "engine_bf16": engine.bfloat16_enabled(),
        "bf16": bf16,
        "optimizer": type(optimizer).__name__,
        "params": sum(p.numel() for p in engine.module.parameters()),
        "losses": losses,
        "loss_decreased": decreased,
        "weights_identical": identical,
        "checksums": [g.tolist() for g in gathered],
    }
    if rank == 0:
        print("DS_ZERO2_RESULT " + json.dumps(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    ok = identical and decreased and engine.zero_optimization_stage() == stage
    return 0 if ok else 1


if __name__ == "__main__":
    from fadscale.runtime.distributed import shutdown

    shutdown(main())  # barrier, destroy the group, os._exit: exits cleanly where gloo teardown can hang
