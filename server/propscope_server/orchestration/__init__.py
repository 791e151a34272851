"""The protocol-agnostic core: plans an explanation and runs it on the backends."""
