"""Training: configs, the pure math of the loop, checkpoints, distribution, and the recipes."""
