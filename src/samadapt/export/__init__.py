"""Deployment: ONNX export of a run (``samadapt export``) and an onnxruntime predictor that needs no torch.

``samadapt.export.onnx`` (needs torch and onnx) writes the graphs and their manifest; ``samadapt.export.runtime``
(needs numpy and onnxruntime only) runs them behind the ``Predictor`` interface. Nothing is imported here, so that
``import samadapt.export.runtime`` never pulls in torch.
"""
