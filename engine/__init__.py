"""Speech recognition engines: model families behind one batched interface, and their scheduler."""
