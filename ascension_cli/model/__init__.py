"""The embedding model: a timm backbone and head, its checkpoint format, its export."""
