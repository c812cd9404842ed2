"""Coverage and set size at 0.9 of the inclusive and the mass-above APS scores (imgcls.calibration)
on a trained model's validation -> test split, as listed in RUN/split.json (class-folder data).

    python bench/conformal_check.py bench/out/trust/ece/mnist/run bench/data/mnist_png
"""

import json
import os
import sys

import numpy as np

from imgcls import calibration as cal
from imgcls.artifact import load_artifact, spec_of
from imgcls.data import decode_images
from imgcls.runtime import batched_logits

run, data = sys.argv[1], sys.argv[2]
model, meta = load_artifact(run)
names = meta["class_names"]
sp = json.load(open(f"{run}/split.json"))
t = meta["calibration"]["temperature"]
out = {}
for split in ("val", "test"):
    rows = sp[split]
    paths = [os.path.join(data, r) for r in rows]
    labels = np.array([names.index(os.path.basename(os.path.dirname(r))) for r in rows])
    dec = decode_images(paths, spec_of(meta), progress=False)
    z = batched_logits(model, dec.images, spec_of(meta), progress=False).numpy()
    out[split] = (cal.softmax(z, t), labels[dec.keep])
(pv, yv), (pt, yt) = out["val"], out["test"]
print(run, "test accuracy", round(float((pt.argmax(1) == yt).mean()), 4))
for inclusive in (True, False):
    q = cal.conformal_quantile(cal.conformal_scores(pv, yv, inclusive=inclusive), 0.9)
    sets = cal.prediction_sets(pt, q, inclusive=inclusive)
    cov = np.mean([y in s for y, s in zip(yt, sets)])
    print(f"  {'inclusive ' if inclusive else 'mass above'}: coverage {cov:.3f}, mean set size {np.mean([len(s) for s in sets]):.2f}")
