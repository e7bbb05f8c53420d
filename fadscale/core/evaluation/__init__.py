"""The parts of `fadscale evaluate` (fadscale/evaluate.py: the config and the evaluation itself): inputs
(sample set, real tiles, evaluator), distances, utility classifiers, and the report."""
