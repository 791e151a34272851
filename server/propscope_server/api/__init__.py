"""The gRPC edge: protobuf <-> domain conversion, the servicer and the server."""
