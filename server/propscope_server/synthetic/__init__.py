"""The synthetic world: images whose causal factors we control, for ground-truth tests."""
