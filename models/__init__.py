"""Physics and networks for ConVAE+NF jet generation: data, models, losses, metrics, training."""
