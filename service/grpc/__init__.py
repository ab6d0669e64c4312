"""The gRPC face of rwkvd: servicers, interceptors, error statuses, protobuf conversion, the aio server."""
