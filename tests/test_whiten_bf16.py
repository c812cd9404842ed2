"""small_cnn's 2x2 whitening convolution in bf16 (pytorch issue 163347: oneDNN summed one tap of
four in bf16 2x2 convolutions on some AMD CPUs). A correct kernel matches float64 arithmetic on
the bf16-rounded inputs and weights up to its own output rounding (bench/whiten_bf16.py prints the
figures)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgcls.models import create_model


@pytest.mark.parametrize("mkldnn", [True, False])
def test_issue_163347_repro_sums_all_four_taps(mkldnn):
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        out = torch.conv2d(torch.ones(1, 1, 2, 2, dtype=torch.bfloat16), torch.ones(1, 1, 2, 2, dtype=torch.bfloat16))
    assert float(out) == 4.0


@pytest.mark.parametrize("channels_last", [True, False])
def test_whitening_conv_in_bf16_is_right_up_to_rounding(channels_last):
    torch.manual_seed(0)
    img = F.interpolate(torch.rand(64, 3, 8, 8), size=32, mode="bilinear", align_corners=False)  # smooth, CIFAR-like
    x = ((img * 255).round() / 255 - 0.5) / 0.25  # (64, 3, 32, 32) normalised as small_cnn sees it
    model = create_model("small_cnn", 10).eval()
    model.init_whitening(x)
    conv = model.whiten
    if channels_last:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    with torch.no_grad():
        conv.bias.normal_(0, 0.1)
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = conv(x).double()  # (64, 24, 31, 31)
        same_inputs = F.conv2d(x.bfloat16().double(), conv.weight.bfloat16().double(), conv.bias.bfloat16().double())
        exact = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
    scale = exact.abs().amax()
    # Measured (Xeon with AMX, torch 2.13): 0.30% of the largest output, the output's bf16 rounding
    # alone; a kernel that drops taps is off by the output's own size.
    assert (bf16 - same_inputs).abs().amax() / scale < 0.01
    # Against float32 inputs the error is larger (2.1% measured): rounding the inputs to bf16, amplified
    # by the whitening filters' differences of neighbouring pixels; still far from a wrong sum.
    assert (bf16 - exact).abs().amax() / scale < 0.05
