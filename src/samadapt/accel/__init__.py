"""Deployment forms of the SAM family, applied from outside: ``accelerate(model, target="cpu" | "onnx")``.

The modules in ``samadapt.models`` are plain reference modules. A target is a set of subclasses of some of them,
each computing its reference class's function in another form: faster kernels for CPU inference (``cpu``:
``accel.cpu``), or the graph an ONNX export should trace (``onnx``: ``accel.onnx_forms``). ``accelerate`` swaps the
class of every module that has a form in the target, in place, the way PEFT injects its layers: parameters, buffers
and state-dict keys stay as they are, PEFT layers inside keep working, and ``reference`` swaps them back.

Where the forms apply: ``runs`` builds and loads models accelerated for the CPU (inference, and training, whose
autograd runs the reference ops: the kernels are taken only without autograd), ``Predictor`` accelerates the model
it is given, ``export.onnx`` exports a copy in the ``onnx`` forms. This package imports ``models``, never the
reverse.
"""

from __future__ import annotations

from torch import nn

from samadapt.accel import cpu, onnx_forms

TARGETS: dict[str, dict[type[nn.Module], type[nn.Module]]] = {"cpu": cpu.FORMS, "onnx": onnx_forms.FORMS}
# the options a target's forms take, as class attributes: their defaults
OPTIONS = ("conv_strips", "window_copies")
_REFERENCE = {form: base for forms in TARGETS.values() for base, form in forms.items()}

__all__ = ["OPTIONS", "TARGETS", "accelerate", "reference"]


def accelerate(model: nn.Module, target: str = "cpu", **options: bool) -> nn.Module:
    """Swap every module of ``model`` that has a form in ``target`` to that form, in place; returns ``model``.

    Args:
        model: any module holding SAM-family modules (a ``Sam``, an encoder, a block); modules already in another
            target's form go to this one.
        target: ``cpu`` (oneDNN's kernels, strips of rows, window copies, oneDNN Graph attention for CPU inference;
            elsewhere the reference ops) or ``onnx`` (the graph forms an ONNX export traces).
        options: ``conv_strips`` (TinyViT's stage 0 in strips of rows) and ``window_copies`` (TinyViT's windows cut
            and merged by copies), for the forms that have them; on unless given False here (a second call resets
            what the first set).

    Raises:
        ValueError: an unknown target or option.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown acceleration target {target!r}; choose one of {', '.join(TARGETS)}")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown acceleration option(s) {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    forms = TARGETS[target]
    for module in model.modules():
        base = _REFERENCE.get(type(module), type(module))
        form = forms.get(base, base)
        if form is base and type(module) is base:
            continue  # no form in any target: left alone
        _clear_options(module)  # options not given: the defaults
        module.__class__ = form
        for name, value in options.items():
            if hasattr(form, name):
                setattr(module, name, bool(value))
    return model


def reference(model: nn.Module) -> nn.Module:
    """Swap every accelerated module of ``model`` back to its reference class, in place; returns ``model``."""
    for module in model.modules():
        base = _REFERENCE.get(type(module))
        if base is not None:
            _clear_options(module)
            module.__class__ = base
    return model


def _clear_options(module: nn.Module) -> None:
    for name in OPTIONS:
        module.__dict__.pop(name, None)
