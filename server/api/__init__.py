"""gRPC servicers: protobuf messages in, engine calls, protobuf messages out."""
