"""Replay a run from one of its checkpoints and log, at every step, Adam's largest step per element.

A training run that collapses (the loss jumps and stays up) is replayed from a checkpoint before the jump:
the trainer resumes there exactly (a run at one thread is deterministic), and before every optimizer step this
tool records the largest |m_hat| / (sqrt(v_hat) + eps) over all elements, in learning rates, and the tensor that
holds it. AdamW bounds the per-element step by (1 - beta1) / sqrt(1 - beta2) learning rates only for one
outlier gradient; steps that grow over many steps in one block before the jump point at that block
(docs/results/real-tiles.md, "A collapse under the recipe's own decay").

    python tools/diag_adam_steps.py RUN --from-step 5500 --to-step 5780 --out replay > steps.jsonl

RUN is a FAD run folder with the checkpoint `checkpoints/step-<from>`; the replay trains into --out (a copy of
that checkpoint, the run's config with run.resume=force), never into RUN. One JSON line per step: step, loss,
grad_norm, adam_max, tensor. AdamW runs only (optim.name adamw).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fadscale.config import FadConfig, load_config  # noqa: E402
from fadscale.errors import FadscaleError  # noqa: E402
from fadscale.train_fad import fad_trainer  # noqa: E402


class _Done(Exception):
    pass


def largest_adam_step(optimizer: torch.optim.Optimizer, names: dict) -> tuple[float, str]:
    """Before `optimizer.step()`: the largest |m_hat| / (sqrt(v_hat) + eps) the step is about to take, and where."""
    worst = (0.0, "")
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if param.grad is None or not state:
                continue
            t = float(state["step"]) + 1
            m = beta1 * state["exp_avg"] + (1 - beta1) * param.grad
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * param.grad.square()
            ratio = ((m / (1 - beta1 ** t)).abs() / ((v / (1 - beta2 ** t)).sqrt() + group["eps"])).max().item()
            if ratio > worst[0]:
                worst = (ratio, names.get(param, "?"))
    return worst


def replay(run: Path, from_step: int, to_step: int, out: Path, overrides: list[str], emit=print) -> list[dict]:
    checkpoint = run / "checkpoints" / f"step-{from_step:08d}"
    if not checkpoint.is_dir():
        raise FadscaleError(f"{checkpoint}: no such checkpoint (the run keeps checkpoint.keep_last of them)")
    if out.resolve() == run.resolve():
        raise FadscaleError(f"--out {out}: the replay must not train into the run it reads")
    if out.exists():
        shutil.rmtree(out)
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)
    cfg = load_config(FadConfig, run / "config.yaml", [f"run.out_dir={out}", "run.resume=force", "train.log_every=1",
                                                       "checkpoint.every=100000000", *overrides])
    if cfg.optim.name != "adamw":
        raise FadscaleError(f"optim.name {cfg.optim.name!r}: this tool reads AdamW's state only")
    trainer = fad_trainer(cfg)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    names = {param: name for name, param in trainer.model.named_parameters()}
    rows: list[dict] = []
    optimizer_step, trainer_step = optimizer.step, trainer.step

    def step_and_record(*args, **kwargs):
        ratio, tensor = largest_adam_step(optimizer, names)
        rows.append({"adam_max": round(ratio, 4), "tensor": tensor})
        return optimizer_step(*args, **kwargs)

    def step_and_emit(batch):
        metrics = trainer_step(batch)
        if "loss/noise" in metrics and rows:
            rows[-1] = {"step": trainer.state["step"], "loss": round(float(metrics["loss/noise"]), 5),
                        "grad_norm": round(float(metrics["train/grad_norm"]), 4), **rows[-1]}
            emit(json.dumps(rows[-1]))
        if trainer.state["step"] >= to_step:
            raise _Done
        return metrics

    optimizer.step, trainer.step = step_and_record, step_and_emit
    try:
        trainer.run()
    except _Done:
        pass
    return [row for row in rows if "step" in row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--from-step", type=int, required=True)
    parser.add_argument("--to-step", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the replay's own run folder (replaced)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        replay(args.run, args.from_step, args.to_step, args.out, args.overrides)
    except FadscaleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
