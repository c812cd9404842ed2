"""The report: one self-contained HTML page per evaluated split (training, `imgcls evaluate`,
`imgcls report`), and the run folder's training records it reads.

Modules: history (metrics.csv and probe.csv), plots (matplotlib figures), gallery (thumbnails,
top losses with Grad-CAM, confused pairs), page (the HTML), write (`write_report`), multilabel (a
multi-label model's PR curves and most wrong images per label, `MultiLabelPredictions`).
"""

from imgcls.report.gallery import Predictions, top_losses
from imgcls.report.history import HISTORY_FIELDS, HISTORY_FILE, PROBE_FILE, read_history, read_probe_sweep, write_probe_sweep
from imgcls.report.multilabel import MultiLabelPredictions
from imgcls.report.plots import plot_confusion_matrix, plot_training_curves
from imgcls.report.write import write_report

__all__ = [
    "HISTORY_FIELDS",
    "HISTORY_FILE",
    "MultiLabelPredictions",
    "PROBE_FILE",
    "Predictions",
    "plot_confusion_matrix",
    "plot_training_curves",
    "read_history",
    "read_probe_sweep",
    "top_losses",
    "write_probe_sweep",
    "write_report",
]
