"""Model backends, their signatures and the per-model scheduling around them."""
