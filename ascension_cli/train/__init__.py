"""The SupCon trainer: epoch loop, gradient cache, checkpoints."""
