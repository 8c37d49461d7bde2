"""`serve --workers N`: the supervisor and its worker and drainer processes."""
