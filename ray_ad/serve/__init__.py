"""The fleet service: per-line detectors behind HTTP on Ray Serve (issue 5, in progress).

Ray-free pieces (access tokens, request decoding) live here next to the Serve glue so that they are
unit-tested without a cluster.
"""
