"""Where bytes live: file I/O, bounded small-file reads, reads by URL, the S3 client, source identities."""
