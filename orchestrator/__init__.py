"""Control plane of compress-sweep: runs where the user types ``sweep``."""
