"""Model builders: the diffusion UNet and the expert classifier."""
