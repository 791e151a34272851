"""propscope's development tooling: the local stack, soak, validation and training."""
