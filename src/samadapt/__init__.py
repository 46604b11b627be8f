"""samadapt: adapt the Segment Anything Model to medical image segmentation."""

__version__ = "0.1.0"
