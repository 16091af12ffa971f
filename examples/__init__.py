"""Worked examples: a plug-in backbone (lightning_dit.py) and a plain PyTorch loop over a latent store."""
