"""Adapters to the model server: Triton calls and tensor layout conversion."""
