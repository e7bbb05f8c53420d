"""The one table of fadscale's stages, named as their commands are (`fadscale train-expert`, `fadscale config
show train-expert`, `fadscale submit train-expert`): the module each runs as, its config class and the launcher
that starts it on several processes. The CLI, SLURM submission and `config show` all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fadscale.errors import FadscaleError


@dataclass(frozen=True)
class Stage:
    command: str  # `fadscale <command>`
    module: str  # `python -m <module> --config F --set k=v` (what launchers and clusters run)
    config: str  # its config class in fadscale.config
    launcher: str  # the launcher for several processes: "torchrun" or "accelerate"; "" for one process only
    aliases: tuple[str, ...] = ()  # other names accepted for it (older spellings, `vanilla` for train)


STAGES: dict[str, Stage] = {stage.command: stage for stage in (
    Stage("train-expert", "fadscale.train_expert", "ExpertConfig", "torchrun", ("expert",)),
    Stage("cache-features", "fadscale.cache_features", "FadConfig", "accelerate", ("cache",)),
    Stage("train", "fadscale.train_fad", "FadConfig", "accelerate", ("fad", "vanilla")),
    Stage("sample", "fadscale.sample", "SampleConfig", "accelerate"),
    Stage("evaluate", "fadscale.evaluate", "EvaluateConfig", ""),
)}


def stage(name: str, multi_process: bool = False) -> Stage:
    """The stage a command name (or alias) stands for; `multi_process`: only those a launcher can start."""
    found = next((s for s in STAGES.values() if name == s.command or name in s.aliases), None)
    names = [s.command for s in STAGES.values() if s.launcher or not multi_process]
    if found is None or found.command not in names:
        raise FadscaleError(f"unknown stage {name!r}: expected one of {', '.join(names)}")
    return found


def by_module(module: str) -> Stage:
    return next(s for s in STAGES.values() if s.module == module)


def config_class(stage: Stage) -> type:
    from fadscale import config

    return getattr(config, stage.config)
