"""Model code that runs inside Triton's python backend (editors and classifiers)."""
