"""Pure scoring math: numpy arrays in, numbers out, no I/O."""
