"""propscope gateway: explains image classifiers served by Triton by gradual interventions."""

__version__ = "0.1.0"
