"""Client libraries and tools that talk to a streamscribe server."""
