"""The gRPC service over model bundles; see DESIGN.md and issue 3."""
