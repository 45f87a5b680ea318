"""Wire dialects: translate one protocol's messages to session calls and events back.

A dialect knows nothing of models or sockets; the gateway drives it."""
