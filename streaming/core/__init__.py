"""The sans-I/O stream core: audio in, VAD segments, engine requests, stable text, captions,
events out. Plain synchronous code, no sockets."""
