"""Turn a MobileSAM checkpoint into the ONNX models of the Triton model repository.

Needs torch; nothing else in the system does. Run as `python -m export`.
"""
