"""Data health: `imgcls audit DATA` finds unreadable files, duplicates and leakage, likely label
errors, outliers and odd images, and writes them as a summary, audit.json and audit.html.

- `run_audit(data, AuditOptions(...)) -> dict`: the report document (its keys: `imgcls.audit.core`);
- `format_summary(report)`, `write_report(report, out_dir)`: the terminal text and the two files;
- `quick_checks(index, hashes_by_path)`: cheap warnings for `imgcls train` (no torch, no decoding);
- `excluded_paths(audit_json)`, `drop_excluded(samples, excluded)`: for `imgcls train --exclude-from`.

Modules: scan (file list, headers), pixels (hash, brightness, blur), features (network or pixel
features, PCA), neighbours (duplicates, outliers), labels (probe, confident learning), core
(`run_audit`), summary and html (outputs), quick (what training uses).
"""

from imgcls.audit.core import FINDING_KINDS, AuditOptions, run_audit
from imgcls.audit.quick import EXCLUDE_KINDS, drop_excluded, excluded_paths, quick_checks
from imgcls.audit.summary import format_summary, write_report

__all__ = [
    "EXCLUDE_KINDS",
    "FINDING_KINDS",
    "AuditOptions",
    "drop_excluded",
    "excluded_paths",
    "format_summary",
    "quick_checks",
    "run_audit",
    "write_report",
]
