"""Parts of the autoencoder trainer: c' sampling, the PatchGAN discriminator, the deterministic image batches."""
