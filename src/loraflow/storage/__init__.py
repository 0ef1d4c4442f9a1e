"""Object storage: the one layer every S3 transfer in loraflow goes through.

- `client`: boto3 clients (credentials from boto3's standard chain, botocore's retry mode: the
  only retry layer for S3 requests), `s3://` URIs, one-line errors
- `store`: `Store`, one bucket: small objects (JSON, aliases), files, listings, deletes
- `transfer`: whole directories up and down: one manifest format (size + sha256 per file), one
  allow-list of file types per kind of directory, verification, atomic placement, fresh mirrors

The registry, training checkpoints, dataset mirrors and base-model mirrors all use `transfer`.
"""
