"""The gRPC service over model bundles and indexes: config, batching, repository, RPC handlers, server, client.

The service rules (config path, status codes, batching, reload, drain) are in docs/architecture.md.
"""
