"""The method itself, apart from any stage: the objective, the alignment, class conditioning, sampling, the
metrics, the learning-curve probe, the models and the evaluation's measurements. Nothing here imports a stage."""
