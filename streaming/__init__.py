"""Everything between a socket (or a file) and the engine: config, audio, sessions, CLI."""
