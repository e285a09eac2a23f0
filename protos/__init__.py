"""optserve's wire contract: generated gRPC code and the tensor codec shared by client and server."""
