"""The training core shared by the expert and FAD trainers: one loop (trainer.py), one checkpoint format
(checkpoint.py), two backends (backend.py: raw DDP, accelerate/DeepSpeed), and the task interface
(task.py) that each trainer implements (fadscale.train_expert.ExpertTask, fadscale.train_fad.FadTask)."""
