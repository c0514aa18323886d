"""A checkpoint's model over images: the forward pass, the embedding pipeline, vectors files."""
