"""Domain operations shared by the gRPC servicers and the HTTP dialects: they speak engine types, not wire types."""
