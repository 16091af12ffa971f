"""The autoencoder: model (DC-AE), trainer and its recipe, dataset encoding into latent stores, reconstruction eval, figures."""
