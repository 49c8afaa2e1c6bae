"""The local folder destination: lock, staging, crash-safe publish."""
