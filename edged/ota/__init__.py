"""Over-the-air model updates: signed bundles (``bundle``), their signing keys (``keys``)."""
