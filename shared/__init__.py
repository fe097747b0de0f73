"""What both stages need: the config schema, the cache contract, model loading and latent packing."""
