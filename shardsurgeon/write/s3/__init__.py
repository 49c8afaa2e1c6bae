"""The S3 folder destination: claim object, multipart parts, config.json last."""
