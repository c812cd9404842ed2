"""The inference path shared by `Classifier`, `imgcls predict` and the HTTP server.

`runners`: one interface over the backends' forward passes (torch, onnxruntime): uint8 prepared
images -> logits. `trust`: what model.json says about trusting the answers (temperature,
"unknown" threshold, conformal scores), fitted at the end of training. `answer`: logits ->
calibrated probabilities and "unknown" verdicts (`postprocess`, with the model's `Trust`) -> the
answer dict every front end returns. Test-time augmentation sits on top of any runner (`runtime.tta_logits`, the
same function evaluation and training use).
"""
