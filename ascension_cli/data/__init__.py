"""Reading class-per-folder image trees: scan, decode, augment, sample."""
