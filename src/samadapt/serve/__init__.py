"""``samadapt serve``: interactive segmentation in the browser (FastAPI app, plain HTML / JS page).

The server holds no model logic of its own: it slices with ``data.preprocess``, predicts with the
``prediction.SegmentationPredictor`` it is given (``inference.load_predictor``) and writes with
``data.io.write_label``. See docs/app.md.
"""

from samadapt.serve.app import create_app
from samadapt.serve.case import Session
from samadapt.serve.session import Workspace

__all__ = ["Session", "Workspace", "create_app"]
