"""lstmd: a gRPC inference server for LSTM language models.

- ``lstmd.client``: the Python client library and the ``lstmd`` command line (the base install);
- ``lstmd.server``: ``lstmd-server`` (the ``server`` extra: ONNX Runtime, numpy, prometheus-client);
- ``lstmd.export``: ``lstmd-export``, training and ONNX export (the ``export`` extra: PyTorch);
- ``lstmd.model``: what a model folder is, shared by the three; ``lstmd.v1``: the generated stubs.

Importing ``lstmd`` imports none of them.
"""
