"""What training takes from the audit: cheap warnings from the content hashes it already has, and
the list of files an audit suggests leaving out (`imgcls train --exclude-from audit.json`).

Nothing here imports torch or decodes an image.

How training uses `excluded_paths` (the lead wires the flag): after `index_dataset`, before
splitting off validation and decoding,

    excluded = excluded_paths(args.exclude_from)
    for split, rows in index.splits.items():
        index.splits[split], dropped = drop_excluded(rows, excluded)
    log(f"left out {n} files listed in {args.exclude_from}")

and after decoding, `quick_checks(index, dict(zip(decoded.paths, decoded.hashes)))` (the hashes of
every split merged) gives the warnings to print.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imgcls.data imports torch; these checks need only the index's fields
    from imgcls.data import DatasetIndex

IMBALANCE_WARN = 10.0  # largest class / smallest class from which training warns
EXCLUDE_KINDS = ("unreadable", "exact_duplicates", "near_duplicates", "label_issues", "near_constant")


def _pointer(index: DatasetIndex) -> str:
    return f"run `imgcls audit {index.root}` for the list"


def quick_checks(index: DatasetIndex, hashes_by_path: dict[str, str]) -> list[str]:
    """Warnings (one line each) about duplicates across splits, conflicting labels and class imbalance.

    hashes_by_path: the SHA-1 of each decoded file (`DecodedImages.hashes`, keyed by its path);
    files missing from it (not decoded) are skipped.
    """
    seen: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for split, rows in index.splits.items():
        for path, label in rows:
            h = hashes_by_path.get(path)
            if h:
                seen[h].append((split, label))
    groups = [v for v in seen.values() if len(v) > 1]
    leaks = [g for g in groups if len({s for s, _ in g}) > 1]
    conflicts = [g for g in groups if len({y for _, y in g}) > 1]
    warnings = []
    if leaks:
        n = sum(len(g) for g in leaks)
        warnings.append(
            f"{len(leaks)} images appear in more than one split ({n} files, identical bytes): "
            f"evaluation scores are inflated; {_pointer(index)}"
        )
    if conflicts:
        n = sum(len(g) for g in conflicts)
        warnings.append(f"{len(conflicts)} images are stored under more than one class ({n} files, identical bytes); {_pointer(index)}")
    totals = [0] * len(index.class_names)
    for rows in index.splits.values():
        for _, y in rows:
            totals[y] += 1
    if totals and min(totals) == 0:
        empty = [index.class_names[c] for c, n in enumerate(totals) if n == 0]
        warnings.append(f"classes without images: {', '.join(empty)}")
    elif totals and max(totals) / min(totals) >= IMBALANCE_WARN:
        big, small = max(range(len(totals)), key=totals.__getitem__), min(range(len(totals)), key=totals.__getitem__)
        warnings.append(
            f"classes are imbalanced {max(totals) / min(totals):.1f}:1 ({index.class_names[big]} {totals[big]}, "
            f"{index.class_names[small]} {totals[small]} images); {_pointer(index)}"
        )
    return warnings


def _normal(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))  # links resolved on both sides: DATA may be reached through one


def excluded_paths(audit_json_path: str | os.PathLike, kinds: tuple[str, ...] = EXCLUDE_KINDS) -> set[str]:
    """Real paths (absolute, links resolved) of the files the audit suggests leaving out, for `kinds`.

    Per entry the audit names what to leave out ("exclude"): unreadable files, every copy of a
    picture that carries two labels, all but one copy of other duplicates (the test copy is kept),
    likely label errors and blank images.
    """
    report = json.loads(Path(audit_json_path).read_text(encoding="utf-8"))
    root = Path(report["root"])
    out = set()
    for kind in kinds:
        for entry in report.get("findings", {}).get(kind, []):
            out.update(_normal(root / p) for p in entry.get("exclude", []))
    return out


def drop_excluded(samples: list[tuple[str, int]], excluded: set[str]) -> tuple[list[tuple[str, int]], int]:
    """(samples whose path is not in `excluded`, how many were dropped); paths are compared normalised."""
    kept = [s for s in samples if _normal(s[0]) not in excluded]
    return kept, len(samples) - len(kept)
