"""Operating the server: settings, metrics, logs."""
