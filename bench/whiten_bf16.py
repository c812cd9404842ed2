"""Is small_cnn's 2x2 whitening convolution right in bf16 on this CPU? (pytorch issue 163347: bf16
2x2 convolutions through oneDNN gave wrong sums on some AMD CPUs, 1 instead of 4.)

    python bench/whiten_bf16.py

Compares the whitening layer under bf16 autocast with (a) float64 on the float32 inputs (the
total error, which includes rounding the inputs and weights to bf16: the whitening filters take
differences of nearly equal pixels, so that rounding is amplified) and (b) float64 on the
bf16-rounded inputs and weights (what a correct bf16 kernel computes, up to its output rounding
and accumulation order). A wrong kernel shows up in (b) as errors of the output's own size; a
correct one stays within a few bf16 ulps (2^-8 = 0.4%) of the largest output. Also runs the
issue's one-line repro, and bf16 with oneDNN off.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from imgcls.models import create_model


def cifar_like(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images (N, 3, 32, 32), quantised to 8 bits, normalised as small_cnn sees them."""
    g = torch.Generator().manual_seed(seed)
    img = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear", align_corners=False)
    return ((img * 255).round() / 255 - 0.5) / 0.25


def whitening_errors(channels_last: bool = True, mkldnn: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    x = cifar_like()
    model = create_model("small_cnn", 10).eval()
    model.init_whitening(x)
    with torch.no_grad():
        model.whiten.bias.normal_(0, 0.1)  # a trained bias, roughly
    conv = model.whiten
    if channels_last:
        x, conv = x.contiguous(memory_format=torch.channels_last), conv.to(memory_format=torch.channels_last)
    w, b = conv.weight, conv.bias
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=mkldnn):
        exact = F.conv2d(x.double(), w.double(), b.double())  # (N, 24, 31, 31)
        fp32 = conv(x)
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = conv(x)
        rounded_in = F.conv2d(x.bfloat16().double(), w.bfloat16().double(), b.bfloat16().double())
    scale = exact.abs().amax()
    return {
        "fp32 vs float64, max error / max |out|": float((fp32.double() - exact).abs().amax() / scale),
        "bf16 vs float64, max error / max |out|": float((bf16.double() - exact).abs().amax() / scale),
        "bf16 vs float64 on bf16-rounded inputs, max error / max |out|": float((bf16.double() - rounded_in).abs().amax() / scale),
        "bf16 output rounding alone, max / max |out|": float((rounded_in.bfloat16().double() - rounded_in).abs().amax() / scale),
        "bf16 vs float64, median per-element relative error": float(
            ((bf16.double() - exact).abs() / exact.abs().clamp_min(1e-3 * scale)).median()
        ),
    }


def issue_repro(mkldnn: bool = True) -> float:
    """pytorch issue 163347: conv2d of a 2x2 image of ones with a 2x2 filter of ones in bf16; 4 is right."""
    with torch.backends.mkldnn.flags(enabled=mkldnn):
        return float(torch.conv2d(torch.ones(1, 1, 2, 2, dtype=torch.bfloat16), torch.ones(1, 1, 2, 2, dtype=torch.bfloat16)))


def main() -> None:
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"avx512_bf16 {'avx512_bf16' in flags}, amx_bf16 {'amx_bf16' in flags}, {torch.get_num_threads()} threads"
    )
    print(f"issue 163347 repro (4 is right): oneDNN {issue_repro(True):g}, oneDNN off {issue_repro(False):g}")
    for cl in (True, False):
        for mkldnn in (True, False):
            print(f"whitening conv, channels_last {cl}, oneDNN {'on' if mkldnn else 'off'}:")
            for k, v in whitening_errors(cl, mkldnn).items():
                print(f"  {k}: {v:.2e}")


if __name__ == "__main__":
    main()
