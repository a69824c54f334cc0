"""FastAPI proxy in front of the MobileSAM Triton models: image, prompt and mask logic."""
