"""protoserve training: the package that produces the weights the server serves."""
