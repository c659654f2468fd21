"""The gRPC API (`sequence_layers.serving.v1`) and its generated Python stubs."""
