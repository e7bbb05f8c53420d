"""Typed configuration for every entry point: the classes (fadscale.config.schema) and their loading from YAML
and `--set section.key=value` overrides, with one-line errors (fadscale.config.loading)."""

from fadscale.config.loading import (
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_VALUES,
    build_config,
    describe_config,
    dump_config,
    load_config,
    parse_override,
    save_config,
    with_settings,
)
from fadscale.config.schema import (
    EvaluateConfig,
    ExpertConfig,
    FadConfig,
    MetricsSection,
    NoiseSection,
    SampleConfig,
    needs_spatial,
    uses_cache,
)

__all__ = ["EvaluateConfig", "ExpertConfig", "FadConfig", "MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_VALUES",
           "MetricsSection", "NoiseSection", "SampleConfig", "build_config", "describe_config", "dump_config",
           "load_config", "needs_spatial", "parse_override", "save_config", "uses_cache", "with_settings"]
