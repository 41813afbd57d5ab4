"""raydrive: train camera 3D detection and end-to-end driving models on Ray clusters."""
__version__ = "0.1.0"
