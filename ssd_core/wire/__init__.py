"""The wire boundary: the codec between core dataclasses and ssd.v1 protos, and tensor transports."""
