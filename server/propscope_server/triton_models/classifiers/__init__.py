"""Classifiers under explanation: the synthetic-world CNNs and their Triton wrapper."""
