"""``accel.accelerate``: module swaps from outside the models. Every module with a form in the target changes class and
nothing else (parameters, buffers, state-dict keys), ``reference`` swaps back, the forms compute the reference's
function, and the entry points (runs, Predictor, the ONNX export's copy) apply them."""

from __future__ import annotations

import pytest
import torch

from samadapt import accel
from samadapt.accel import accelerate, cpu, onnx_forms
from samadapt.accel import strips as conv_strips
from samadapt.models.registry import assemble_sam
from tests.models.test_tiny_vit import SLIM, reference_pair


def classes(model: torch.nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


def test_targets_swap_classes_only_and_reference_swaps_back():
    ours, _ = reference_pair(64, SLIM, seed=1)
    plain_classes = classes(ours)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    tensors = [t.data_ptr() for t in ours.state_dict().values()]
    for target, forms in accel.TARGETS.items():
        assert accelerate(ours, target) is ours
        swapped = [type(m) for m in ours.modules() if type(m) in forms.values()]
        assert swapped and all(type(m) not in forms for m in ours.modules()), target
        assert [t.data_ptr() for t in ours.state_dict().values()] == tensors  # the same tensors, keys unchanged
    assert sum(isinstance(m, onnx_forms.WindowAttention) for m in ours.modules()) == sum(SLIM["depths"][1:])
    accelerate(ours, "cpu")  # from one target to the other
    assert not any(type(m) in onnx_forms.FORMS.values() for m in ours.modules())
    assert accel.reference(ours) is ours
    assert classes(ours) == plain_classes
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())


def test_options_are_arguments_of_each_call():
    ours, _ = reference_pair(64, SLIM, seed=1)
    accelerate(ours, window_copies=False, conv_strips=False)
    merging, attention = ours.layers[0].downsample, ours.layers[1].blocks[0].attn
    assert isinstance(merging, cpu.PatchMerging) and not merging.conv_strips and not attention.window_copies
    accelerate(ours)  # not given: the defaults again
    assert merging.conv_strips and attention.window_copies
    with pytest.raises(ValueError, match="acceleration target"):
        accelerate(ours, "tensorrt")
    with pytest.raises(ValueError, match="acceleration option"):
        accelerate(ours, strips=False)


def test_onnx_forms_compute_the_reference_function_in_eager_torch(monkeypatch):
    """Stage 0 in graph strips (forced: the slim model's stage is under the size they start at), the window
    attention with one transpose each way, on a 200 x 200 input whose windows all pad."""
    ours, reference = reference_pair(200, SLIM, seed=2)
    image = torch.rand(2, 3, 200, 200, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ours(image)
        monkeypatch.setattr(conv_strips, "large_hidden", lambda x, hidden, itemsize: True)
        monkeypatch.setattr(conv_strips, "STRIP_BYTES", 7 * 200 * 64 * 4)  # 7 rows of stage 0: a shorter last strip
        got = accelerate(ours, "onnx")(image)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_entry_points_apply_the_forms(tmp_path):
    from samadapt.export.onnx import deployable_copy
    from samadapt.models.tiny_vit import TinyViT
    from samadapt.predict import Predictor
    from samadapt.runs import build_base

    torch.manual_seed(0)
    model = assemble_sam(TinyViT(img_size=64, **SLIM), 64, sam_normalisation=False).eval()
    copied, _ = deployable_copy(model)
    assert isinstance(copied.mask_decoder, onnx_forms.MaskDecoder)
    assert type(model.mask_decoder) is not onnx_forms.MaskDecoder  # the model itself is left as it was
    Predictor(model, device="cpu")
    assert isinstance(model.mask_decoder, cpu.MaskDecoder)
    assert isinstance(model.image_encoder.layers[1].blocks[0].attn, cpu.WindowAttention)
    trained = build_base("lite_medsam", None, 64, 2)  # what training, pre-training and load_run start from
    assert isinstance(trained.mask_decoder, cpu.MaskDecoder) and trained.mask_decoder.semantic
