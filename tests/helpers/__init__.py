"""What the tests run besides themselves: a local SLURM cluster, a stand-in stage for SLURM jobs, the
DeepSpeed ZeRO-2 check script."""
