"""The I/O edge: WebSocket and AudioSocket connections, the REST upload port, telephony call
subscribers, the event loop choice."""
