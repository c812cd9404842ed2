"""The inference path shared by `Classifier`, `imgcls predict` and the HTTP server.

`runners`: one interface over the backends' forward passes (torch, onnxruntime): uint8 prepared
images -> logits. `answer`: logits -> probabilities (`postprocess`) -> the answer dict every
front end returns. Test-time augmentation sits on top of any runner (`runtime.tta_logits`, the
same function evaluation and training use).
"""
