"""The control plane: operator commands on their own socket, sharing the registry with the data
path but never its socket."""
