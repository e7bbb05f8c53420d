"""A weak-scaling model for data-parallel training (DDP and DeepSpeed ZeRO-2), and its check against a real
2-process gloo run on this machine.

    python tools/bench_scale.py                          # the model for tiny-sd + the gloo sweep + the CPU check
    python tools/bench_scale.py --step-s 0.37 --intra-busbw 150 --inter-busbw 50 --no-check
    python tools/bench_scale.py --check-batches 16 2 --check-rounds 3

Weak scaling: every GPU keeps its batch (--batch per GPU), so the ideal step time stays that of one GPU and
efficiency(n) = step(1) / step(n). What grows with n is the gradient traffic that is not hidden.

The model, per step:
- Gradient bytes: the FAD model's parameters (UNet of --preset with the class embedding, the class-token
  table, the seed projector from the expert's 2048-d feature) x bytes per gradient: DDP 4 (fp32 weights
  under bf16 autocast keep fp32 gradients), ZeRO-2 2 (launch/deepspeed/zero2.json: bf16, so bf16
  gradients and weights on the wire).
- DDP buckets: the parameters in reverse order (the order backward produces their gradients), cut into
  buckets of 25 MiB (bucket_cap_mb), the first capped at 1 MiB (torch's first-bucket size, so communication
  starts early); a parameter larger than the cap is a bucket alone. (torch 2.14's DDP starts with one bucket
  and its reducer rebuilds them this way after the first iteration, in the order the gradients came.) ZeRO-2 buckets: reduce_bucket_size
  and allgather_bucket_size elements (5e7 in the project's zero2.json).
- Collectives on a ring of n ranks, bus bandwidth bw, latency alpha per ring step:
  all-reduce 2(n-1) alpha + 2(n-1)/n x bytes / bw; reduce-scatter and all-gather (n-1) alpha +
  (n-1)/n x bytes / bw each (together the bytes of one all-reduce). Within a node (n <= --gpus-per-node)
  the intra-node figures apply; beyond, the ring crosses nodes and the inter-node figures bound it.
- Overlap: bucket k is ready when backward has produced its share of the bytes (gradients assumed to
  come out at a constant byte rate over --backward-fraction of the step); one collective runs at a time,
  in bucket order. Exposed time = when the last collective ends minus when backward ends (>= 0): what
  exceeds the overlappable backward, and at least the last bucket. "no overlap" puts every collective
  after backward (an upper bound). ZeRO-2 (overlap_comm true): the gradients' reduce-scatter overlaps as
  above; the parameters' all-gather after the optimizer step is exposed in full. Compute is assumed not to
  slow down while a collective runs, and ZeRO-2's smaller optimizer step (1/n of the states) is not
  credited: both optimistic/pessimistic by a few percent at most at these sizes.

Assumed NCCL figures (not measured: no GPU was lent to this session; override them): --intra-busbw 150
GB/s (H100/H200 NVLink all-reduce bus bandwidth at 25-100 MiB messages; nccl-tests peaks are higher),
--inter-busbw 50 GB/s per GPU (one 400 Gb/s InfiniBand NIC per GPU, 8 per node, at line rate: an upper
bound), --intra-latency-us 2 and --inter-latency-us 5 per ring step. Step time: --step-s 0.37 (173.1
img/s at batch 64 bf16, tiny-sd FAD step with the cache on one H200, the figure issue 15 quotes; it is not
in this checkout's docs and was not measured here).

The check (this machine, CPU): gloo all-reduce between 2 local processes at several sizes, fitted to
latency + bytes / bandwidth; then a plain DDP step (the cpu-base UNet with the class embedding and token
table, bf16 autocast, AdamW; the same UNet as the demo's Trainer step) timed with 1 process, with 2
independent processes side by side (no communication: what sharing the 2 cores costs by itself), and with 2
DDP processes over gloo; 1 torch thread each (2 processes x 1 thread vs 1 x 1 is the fair weak-scaling
comparison on 2 cores). Rounds interleave the three. The model's prediction from the measured 1-process
forward/backward/optimizer times and the gloo fit is printed against the measured efficiencies.

The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fadscale.runtime.cpu_load import OtherLoad  # noqa: E402

MIB = 2**20
DDP_BUCKET_BYTES = 25 * MIB  # DistributedDataParallel(bucket_cap_mb=25)
DDP_FIRST_BUCKET_BYTES = 1 * MIB  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
EXPERT_DIM = 2048  # resnet50's pooled feature: the seed projector's input (configs/fad.yaml's expert)
CLASSES = 8


# ------------------------------------------------------------------------------------- the arithmetic


def ring_allreduce_s(nbytes: float, n: int, busbw: float, latency: float) -> float:
    """Ring all-reduce of `nbytes` over n ranks: 2(n-1) steps of latency, each rank sends 2(n-1)/n x bytes.
    `busbw` in bytes/s, `latency` in s per ring step. 0 for one rank (nothing to exchange)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / busbw


def ring_half_s(nbytes: float, n: int, busbw: float, latency: float) -> float:
    """Reduce-scatter or all-gather of `nbytes` (the whole tensor) over n ranks: half an all-reduce."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return (n - 1) * latency + (n - 1) / n * nbytes / busbw


def buckets(param_bytes: list[int], cap: int, first_cap: int | None = None) -> list[int]:
    """Cut parameters (bytes each, in the order their gradients become ready) into buckets of at most `cap`
    bytes (the first at most `first_cap`); a parameter larger than the cap goes alone."""
    out, current, limit = [], 0, first_cap or cap
    for size in param_bytes:
        if current and current + size > limit:
            out.append(current)
            current, limit = 0, cap
        current += size
        if current >= limit:
            out.append(current)
            current, limit = 0, cap
    if current:
        out.append(current)
    return out


def exposed_s(bucket_bytes: list[int], comm_s: list[float], backward_s: float, overlap: bool = True) -> float:
    """Communication time not hidden behind backward. Bucket k is ready once backward has produced the bytes
    up to and including it (constant byte rate); collectives run one at a time in bucket order. Without
    overlap every collective starts after backward."""
    total = float(sum(bucket_bytes)) or 1.0
    done, end = 0.0, 0.0
    for nbytes, seconds in zip(bucket_bytes, comm_s):
        done += nbytes
        ready = backward_s * done / total if overlap else backward_s
        end = max(end, ready) + seconds
    return max(0.0, end - backward_s) if comm_s else 0.0


def link(n: int, net: dict) -> tuple[float, float]:
    """(bus bandwidth bytes/s, latency s) of a ring over n ranks: the intra-node figures within a node, else
    the slower of intra and inter (the ring crosses node boundaries)."""
    if n <= net["gpus_per_node"]:
        return net["intra_busbw"], net["intra_latency"]
    return min(net["intra_busbw"], net["inter_busbw"]), max(net["intra_latency"], net["inter_latency"])


def predict_ddp(n: int, step_s: float, backward_s: float, param_bytes: list[int], net: dict,
                overlap: bool = True, cap: int = DDP_BUCKET_BYTES, first_cap: int = DDP_FIRST_BUCKET_BYTES) -> dict:
    """Predicted DDP step over n ranks: the one-rank step plus the exposed all-reduce time."""
    sizes = buckets(param_bytes, cap, first_cap)
    busbw, latency = link(n, net)
    comm = [ring_allreduce_s(b, n, busbw, latency) for b in sizes]
    exposed = exposed_s(sizes, comm, backward_s, overlap) if n > 1 else 0.0
    return {"n": n, "buckets": len(sizes), "comm_s": sum(comm) if n > 1 else 0.0, "exposed_s": exposed,
            "step_s": step_s + exposed, "efficiency": step_s / (step_s + exposed)}


def predict_zero2(n: int, step_s: float, backward_s: float, param_bytes: list[int], net: dict,
                  reduce_bucket: int, allgather_bucket: int, overlap: bool = True) -> dict:
    """Predicted ZeRO-2 step: gradients reduce-scattered in reduce buckets (overlapped with backward when
    `overlap`), then the updated parameters all-gathered after the optimizer step (exposed in full)."""
    busbw, latency = link(n, net)
    reduce = buckets(param_bytes, reduce_bucket)
    scatter = [ring_half_s(b, n, busbw, latency) for b in reduce]
    gather = [ring_half_s(b, n, busbw, latency) for b in buckets(param_bytes, allgather_bucket)]
    exposed = (exposed_s(reduce, scatter, backward_s, overlap) + sum(gather)) if n > 1 else 0.0
    return {"n": n, "buckets": len(reduce), "comm_s": sum(scatter) + sum(gather) if n > 1 else 0.0,
            "exposed_s": exposed, "step_s": step_s + exposed, "efficiency": step_s / (step_s + exposed)}


def fit_line(sizes: list[float], seconds: list[float], small: float = 64 * 1024, large: float = MIB
             ) -> tuple[float, float]:
    """t = a + bytes / bw: a = the median time of the small messages (<= `small` bytes: pure latency), bw
    from the large ones (>= `large`) by least squares through the origin on t - a. One global least-squares
    line would let the 64 MiB point set the latency and the 4 KiB points bend the bandwidth."""
    a = statistics.median([t for x, t in zip(sizes, seconds) if x <= small])
    big = [(x, t - a) for x, t in zip(sizes, seconds) if x >= large]
    return a, sum(x * x for x, _ in big) / sum(x * y for x, y in big)


# ------------------------------------------------------------------------------------- the FAD model's parameters


def fad_parameters(preset: str, size: int, channels: int = 1) -> list[torch.Tensor]:
    """The trainable tensors of the FAD model (fadscale.core.fad.FadModel: UNet with the class embedding,
    the class-token table, the seed projector) in registration order, on the meta device (no memory)."""
    from fadscale.core.align import SeedProjector
    from fadscale.core.models.unet import build_unet

    with torch.device("meta"):
        unet = build_unet(preset, channels, size, None, CLASSES + 1)
        table = torch.empty(CLASSES + 1, 1, unet.config.cross_attention_dim)
        shortcut = unet.get_submodule("down_blocks.2.resnets.0.conv_shortcut")
        projector = SeedProjector(EXPERT_DIM, shortcut.out_channels)
    return [*unet.parameters(), table, *projector.parameters()]


def grad_order_bytes(params: list[torch.Tensor], bytes_per: int) -> list[int]:
    """Bytes per gradient in the order backward produces them (reverse of registration, DDP's assumption)."""
    return [p.numel() * bytes_per for p in reversed(params)]


# ------------------------------------------------------------------------------------- measurements (processes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _shutdown(world: int) -> None:
    """barrier + destroy + os._exit: gloo otherwise aborts at interpreter exit now and then (docs/facts.md)."""
    import torch.distributed as dist

    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _gloo_worker(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    _init(rank, world, port)
    result = {}
    for nbytes in sizes:
        tensor = torch.ones(nbytes // 4)
        reps = 30 if nbytes <= MIB else 8
        dist.all_reduce(tensor)  # warm-up (connections, buffers)
        times = []
        for _ in range(reps):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        result[nbytes] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    _shutdown(world)


class _StepModel(torch.nn.Module):
    """UNet + class-token table in one module (as FadModel), returning the loss: DDP sees the whole step."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.table = torch.nn.Parameter(torch.randn(CLASSES + 1, 1, unet.config.cross_attention_dim) * 0.02)

    def forward(self, x, t, labels, target):
        pred = self.unet(x, t, self.table[labels], class_labels=labels).sample
        return torch.nn.functional.mse_loss(pred.float(), target)


def _step_worker(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """A plain data-parallel step of the demo's UNet (cpu-base with the class embedding and token table, bf16
    autocast, AdamW) on random data; under DDP (gloo) when spec["ddp"], else unwrapped (as the trainer runs
    one process). Times the whole step and its forward / backward / optimizer parts."""
    torch.set_num_threads(1)
    if spec["ddp"]:
        _init(rank, world, port)
    from fadscale.core.models.unet import build_unet

    torch.manual_seed(0)  # the same initial weights on every rank
    model = _StepModel(build_unet(spec["preset"], 1, spec["size"], None, CLASSES + 1))
    wrapped = model
    if spec["ddp"]:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    batch, size = spec["batch"], spec["size"]
    x = torch.randn(batch, 1, size, size, generator=gen)
    target = torch.randn(x.shape, generator=gen)
    labels = torch.arange(batch) % CLASSES
    t = torch.randint(0, 1000, (batch,), generator=gen)
    times, parts = [], {"forward": [], "backward": [], "optimizer": []}
    for i in range(spec["warmup"] + spec["reps"]):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["precision"] == "bf16"):
            loss = wrapped(x, t, labels, target)
        after_forward = time.perf_counter()
        loss.backward()  # under DDP: returns once every bucket's all-reduce is done
        after_backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if i >= spec["warmup"]:
            times.append(end - start)
            parts["forward"].append(after_forward - start)
            parts["backward"].append(after_backward - after_forward)
            parts["optimizer"].append(end - after_backward)
    result = {"rank": rank, "s_per_step": statistics.median(times), "times": times,
              **{f"{k}_s": statistics.median(v) for k, v in parts.items()},
              "params": sum(p.numel() for p in model.parameters()),
              "param_bytes": [p.numel() * p.element_size() for p in model.parameters()]}
    if spec["ddp"]:  # the construction-time assignment: one bucket; the reducer rebuilds it after iteration 1
        result["ddp_initial_bucket_sizes"] = wrapped._get_ddp_logging_data().get("bucket_sizes")
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))
    _shutdown(world if spec["ddp"] else 1)


def spawn(target, world: int, args: tuple, timeout: float = 900) -> None:
    """`world` spawned processes running target(rank, world, *args), one torch thread each; raise if one fails."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise SystemExit(f"{target.__name__}: a process exited with {failed}")


def gloo_sweep(sizes: list[int]) -> dict[int, float]:
    """Median all-reduce seconds per message size (bytes) between 2 local gloo processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gloo.json"
        spawn(_gloo_worker, 2, (free_port(), sizes, str(out)))
        return {int(k): v for k, v in json.loads(out.read_text()).items()}




def step_run(spec: dict, world: int, ddp: bool) -> list[dict]:
    """One arm of the check: `world` processes (DDP over gloo, or independent ones side by side). Each rank's
    result also carries the machine's other load during the arm (CPUs busy outside these processes)."""
    with tempfile.TemporaryDirectory() as tmp, OtherLoad(children=True) as load:
        out = str(Path(tmp) / "step")
        spawn(_step_worker, world, (free_port(), {**spec, "ddp": ddp}, out))
        results = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(world)]
    for r in results:
        r["other_load_cpus"] = load.cpus
    return results


# ------------------------------------------------------------------------------------- report


def model_table(args, net: dict) -> dict:
    """Predicted weak-scaling efficiency for the FAD model of --preset at --batch per GPU."""
    params = fad_parameters(args.preset, args.size)
    count = sum(p.numel() for p in params)
    ddp_bytes = grad_order_bytes(params, 4)
    zero_bytes = grad_order_bytes(params, 2)
    backward = args.step_s * args.backward_fraction
    rows = []
    for n in args.gpus:
        rows.append({"n": n,
                     "ddp": predict_ddp(n, args.step_s, backward, ddp_bytes, net),
                     "ddp_no_overlap": predict_ddp(n, args.step_s, backward, ddp_bytes, net, overlap=False),
                     "zero2": predict_zero2(n, args.step_s, backward, zero_bytes, net, args.zero_bucket * 2,
                                            args.zero_bucket * 2)})
    print(f"Weak-scaling model: {args.preset} FAD model ({count:,} parameters: UNet with class embedding, token "
          f"table, seed projector), batch {args.batch} per GPU, {args.size} px")
    print(f"  step on one GPU {args.step_s:.3f} s (input), backward {args.backward_fraction:.0%} of it "
          f"({backward:.3f} s, overlappable)")
    print(f"  DDP: fp32 gradients {sum(ddp_bytes) / MIB:,.1f} MiB in {len(buckets(ddp_bytes, DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES))} "
          f"buckets (25 MiB, first 1 MiB); ZeRO-2: bf16 gradients {sum(zero_bytes) / MIB:,.1f} MiB, buckets of "
          f"{args.zero_bucket:.0e} elements, all-gather of the bf16 weights after the step (exposed)")
    print(f"  network (assumed): {net['gpus_per_node']} GPUs per node; intra-node bus bandwidth "
          f"{net['intra_busbw'] / 1e9:.0f} GB/s, {net['intra_latency'] * 1e6:.0f} us per ring step; inter-node "
          f"{net['inter_busbw'] / 1e9:.0f} GB/s per GPU, {net['inter_latency'] * 1e6:.0f} us per ring step")
    print(f"{'GPUs':>5s} {'nodes':>5s} | {'DDP exposed ms':>14s} {'eff':>6s} {'no-overlap eff':>14s} | "
          f"{'ZeRO-2 exposed ms':>17s} {'eff':>6s}")
    for row in rows:
        n = row["n"]
        print(f"{n:5d} {max(1, -(-n // net['gpus_per_node'])):5d} | {row['ddp']['exposed_s'] * 1e3:14.1f} "
              f"{row['ddp']['efficiency']:6.3f} {row['ddp_no_overlap']['efficiency']:14.3f} | "
              f"{row['zero2']['exposed_s'] * 1e3:17.1f} {row['zero2']['efficiency']:6.3f}")
    return {"preset": args.preset, "parameters": count, "step_s": args.step_s, "backward_s": backward,
            "ddp_grad_bytes": sum(ddp_bytes), "zero2_grad_bytes": sum(zero_bytes), "rows": rows}


def check(args) -> dict:
    """Measure gloo all-reduce and the 1 / 2-process CPU step; print the model's prediction against it."""
    sizes = [2**k for k in range(12, 27, 2)]  # 4 KiB .. 64 MiB
    sweep = gloo_sweep(sizes)
    latency_s, bandwidth = fit_line(list(sweep), list(sweep.values()))
    print("\ngloo all-reduce, 2 local processes, 1 thread each (median per size):")
    for nbytes, seconds in sweep.items():
        print(f"  {nbytes / MIB:9.3f} MiB  {seconds * 1e3:8.3f} ms")
    print(f"  fit: t = {latency_s * 1e6:.0f} us + bytes / {bandwidth / 1e9:.2f} GB/s "
          f"(as a 2-rank ring: {latency_s / 2 * 1e6:.0f} us per step, bus bandwidth {bandwidth / 1e9:.2f} GB/s)")
    net = {"gpus_per_node": 2, "intra_busbw": bandwidth, "intra_latency": latency_s / 2,
           "inter_busbw": bandwidth, "inter_latency": latency_s / 2}
    checks = []
    for batch in args.check_batches:
        spec = {"preset": "cpu-base", "size": 32, "batch": batch, "precision": "bf16", "warmup": 2,
                "reps": args.check_reps}
        arms = {"one": [], "two-independent": [], "two-ddp": []}
        for _ in range(args.check_rounds):  # interleaved, so a neighbour's load falls on every arm
            arms["one"].append(step_run(spec, 1, ddp=False))
            arms["two-independent"].append(step_run(spec, 2, ddp=False))
            arms["two-ddp"].append(step_run(spec, 2, ddp=True))

        def pooled(arm, key="times"):
            values = [r[key] for run in arms[arm] for r in run]
            return statistics.median([t for v in values for t in v] if key == "times" else values)

        one, alone2, ddp2 = pooled("one"), pooled("two-independent"), pooled("two-ddp")
        backward = pooled("one", "backward_s")
        param_bytes = list(reversed(arms["one"][0][0]["param_bytes"]))
        pred = predict_ddp(2, one, backward, param_bytes, net)
        pred_no = predict_ddp(2, one, backward, param_bytes, net, overlap=False)
        shared_backward = pooled("two-independent", "backward_s")
        pred_shared = predict_ddp(2, alone2, shared_backward, param_bytes, net)
        row = {"batch": batch, "one_s": one, "two_independent_s": alone2, "two_ddp_s": ddp2,
               "one_forward_s": pooled("one", "forward_s"), "one_backward_s": backward,
               "one_optimizer_s": pooled("one", "optimizer_s"), "grad_bytes": sum(param_bytes),
               "model_buckets": buckets(param_bytes, DDP_BUCKET_BYTES, DDP_FIRST_BUCKET_BYTES),
               "ddp_initial_bucket_sizes": arms["two-ddp"][0][0].get("ddp_initial_bucket_sizes"),
               "predicted_comm_s": pred["comm_s"], "predicted_exposed_s": pred["exposed_s"],
               "predicted_efficiency": pred["efficiency"], "predicted_efficiency_no_overlap": pred_no["efficiency"],
               "predicted_efficiency_with_sharing": one / pred_shared["step_s"],
               "measured_efficiency": one / ddp2, "measured_sharing_efficiency": one / alone2,
               "measured_comm_efficiency": alone2 / ddp2,
               "per_round_efficiency": [statistics.median(arms["one"][k][0]["times"]) /
                                        statistics.median([t for r in run for t in r["times"]])
                                        for k, run in enumerate(arms["two-ddp"])],
               "other_load_cpus_max": max(run[0]["other_load_cpus"] for runs in arms.values() for run in runs)}
        checks.append(row)
    print(f"\nCheck: cpu-base UNet step, 32 px, bf16 autocast, batch per process as listed, 1 thread per process, "
          f"median of {args.check_reps} steps x {args.check_rounds} interleaved rounds")
    print(f"{'batch':>5s} {'1 proc s':>9s} {'2 indep s':>9s} {'2 DDP s':>9s} | {'pred eff':>8s} {'no-ovl':>7s} "
          f"{'pred+share':>10s} | {'meas eff':>8s} {'sharing':>7s} {'comm':>6s}  per-round eff  other load")
    for r in checks:
        print(f"{r['batch']:5d} {r['one_s']:9.3f} {r['two_independent_s']:9.3f} {r['two_ddp_s']:9.3f} | "
              f"{r['predicted_efficiency']:8.3f} {r['predicted_efficiency_no_overlap']:7.3f} "
              f"{r['predicted_efficiency_with_sharing']:10.3f} | {r['measured_efficiency']:8.3f} "
              f"{r['measured_sharing_efficiency']:7.3f} {r['measured_comm_efficiency']:6.3f}  "
              f"{' '.join(f'{e:.2f}' for e in r['per_round_efficiency']):13s}  {r['other_load_cpus_max']:.2f}")
    print("  pred eff: the model (1-process step + exposed all-reduce from the gloo fit); no-ovl: every bucket after "
          "backward;\n  pred+share: the model on the 2-independent-process step (the cores shared, no communication);"
          "\n  meas eff = 1 proc / 2 DDP; sharing = 1 proc / 2 independent; comm = 2 independent / 2 DDP "
          "(what the model predicts);\n  other load: the most CPUs busy outside the benchmark during any arm "
          "(a neighbour's burst shows here).")
    return {"gloo": {"sizes": sweep, "latency_s": latency_s, "bandwidth_Bps": bandwidth}, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--preset", default="tiny-sd", help="fadscale UNet preset of the modelled run")
    parser.add_argument("--size", type=int, default=64, help="tile size of the modelled run")
    parser.add_argument("--batch", type=int, default=64, help="batch per GPU of the modelled run (label only: "
                        "the step time carries it)")
    parser.add_argument("--step-s", type=float, default=0.37,
                        help="one GPU's step at --batch (default: 173.1 img/s at batch 64 on an H200, issue 15's "
                        "figure, not measured here)")
    parser.add_argument("--backward-fraction", type=float, default=0.6,
                        help="share of the step that is backward (overlappable); assumed: 0.6 (backward ~2x forward, "
                        "plus the optimizer and data)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--intra-busbw", type=float, default=150.0, help="GB/s (gigabytes), NCCL bus bandwidth "
                        "within a node (assumed)")
    parser.add_argument("--inter-busbw", type=float, default=50.0, help="GB/s (gigabytes) per GPU between nodes "
                        "(assumed: one 400 Gb/s NIC per GPU)")
    parser.add_argument("--intra-latency-us", type=float, default=2.0, help="per ring step (assumed)")
    parser.add_argument("--inter-latency-us", type=float, default=5.0, help="per ring step (assumed)")
    parser.add_argument("--zero-bucket", type=float, default=5e7, help="ZeRO-2 reduce/allgather bucket, elements "
                        "(launch/deepspeed/zero2.json)")
    parser.add_argument("--no-check", action="store_true", help="only the model, no measurement")
    parser.add_argument("--check-batches", type=int, nargs="+", default=[16, 2],
                        help="per-process batches of the CPU check (16: the demo's; 2: communication weighs more)")
    parser.add_argument("--check-reps", type=int, default=8)
    parser.add_argument("--check-rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = {"gpus_per_node": args.gpus_per_node, "intra_busbw": args.intra_busbw * 1e9,
           "intra_latency": args.intra_latency_us * 1e-6, "inter_busbw": args.inter_busbw * 1e9,
           "inter_latency": args.inter_latency_us * 1e-6}
    table = model_table(args, net)
    measured = None if args.no_check else check(args)
    print(json.dumps({"bench": "scale", "assumptions": {**net, "backward_fraction": args.backward_fraction,
                                                        "step_s": args.step_s, "ddp_bucket_bytes": DDP_BUCKET_BYTES,
                                                        "ddp_first_bucket_bytes": DDP_FIRST_BUCKET_BYTES,
                                                        "zero_bucket_elements": args.zero_bucket},
                      "model": table, "check": measured}))


if __name__ == "__main__":
    main()
