"""Training the shipped shapes model: architecture configs, data, the training loop, evaluation with the checker."""
