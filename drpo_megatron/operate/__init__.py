"""Operating on clusters: memory/layout planning (``drpo plan``) and SLURM submission."""
