"""Training recipes: data preparation, the GILL training loop (torchrun), the decision classifier."""
