"""Training tasks that several systems share, built on the core loop (between models/losses and
systems/): a classifier head on fixed embeddings, an image classifier with batch statistics."""
