"""One module per public gRPC service; each converts protobuf to domain calls and back, nothing more."""
