"""What the data check found, from the scan's records: a JSON-able report and its readable summary.

Problems (what makes the check fail): unreadable images, exact duplicate files inside a split,
files shared by two splits (leakage: the same image trained on and evaluated), and near-duplicates
across splits (pHash distance <= `near_distance`: a resized or re-encoded copy). Worth knowing but
accepted: class imbalance, images smaller than the training crop (upsampled), colour modes other
than RGB (converted), and readable files with data after their end marker.
"""

from __future__ import annotations

import os

import numpy as np

from jaxclf.data.scan import FORMATS, MODES, STATUS_PROBLEM, SplitScan
from jaxclf.data.sources import SPLITS

MAX_LISTED = 1000  # per finding in report.json (counts stay exact); unreadable files are all listed


def build_report(
    splits: dict,
    scans: dict[str, SplitScan],
    *,
    full: bool,
    crop_size: int | None,
    near_distance: int,
    about: dict,
    skipped: dict[str, str] | None = None,
) -> dict:
    """The report of one check. `about` describes the data (source, root, ...); `skipped[split]`
    says why a split was not scanned (e.g. TFDS in the fast check)."""
    report = {
        **about,
        "check": "full" if full else "fast",
        "images": {name: len(source) for name, source in splits.items()},
        "skipped_splits": dict(skipped or {}),
        "unreadable": [
            {"split": name, "index": i, "file": _name(splits[name], name, i), "reason": reason}
            for name, scan in scans.items() for i, reason in sorted(scan.problems.items())
        ],
        "notes": [
            {"split": name, "file": _name(splits[name], name, i), "note": note}
            for name, scan in scans.items() for i, note in sorted(scan.notes.items())
        ],
        "class_counts": {name: source.class_counts() for name, source in splits.items()},
        "imbalance": {name: _imbalance(source.class_counts()) for name, source in splits.items()},
        "crop_size": crop_size,
        "smaller_than_crop": _smaller_than(splits, scans, crop_size),
        "modes": {name: _counts(MODES, scan) for name, scan in scans.items()},
        "formats": {name: _counts(FORMATS, scan, "format") for name, scan in scans.items()},
    }
    if full:
        groups = _exact_groups(scans)
        report["exact_duplicates"] = _duplicates(splits, scans, groups)
        report["near_duplicates"] = _near_duplicates(splits, scans, near_distance)
    report["problems"] = problem_count(report)
    return report


def problem_count(report: dict) -> int:
    """Unreadable images + duplicate groups inside splits + groups shared by splits + near-duplicate pairs."""
    exact = report.get("exact_duplicates", {})
    return (len(report["unreadable"]) + exact.get("within_split_groups", 0) + exact.get("across_splits_groups", 0)
            + report.get("near_duplicates", {}).get("pairs_found", 0))


def _name(source, split: str, index: int) -> str:
    paths = getattr(source, "paths", None)
    return paths[index] if paths is not None else f"{split}[{index}]"


def _imbalance(counts: dict[str, int]) -> dict:
    """Largest and smallest class, their ratio, and the classes with no image in this split."""
    present = {name: n for name, n in counts.items() if n}
    if not present:
        return {"largest": None, "smallest": None, "ratio": None, "missing_classes": list(counts)}
    largest, smallest = max(present, key=present.get), min(present, key=present.get)
    return {
        "largest": [largest, present[largest]],
        "smallest": [smallest, present[smallest]],
        "ratio": round(present[largest] / present[smallest], 3),
        "missing_classes": [name for name, n in counts.items() if not n],
    }


def _smaller_than(splits: dict, scans: dict[str, SplitScan], crop_size: int | None) -> dict:
    """Readable images with a side shorter than the training crop (its ops upsample them)."""
    if crop_size is None:
        return {"count": 0, "files": []}
    found = []
    for name, scan in scans.items():
        r = scan.records
        small = np.flatnonzero(((r["width"] < crop_size) | (r["height"] < crop_size)) & (r["status"] & STATUS_PROBLEM == 0))
        found += [(name, int(i)) for i in small]
    return {"count": len(found), "files": [
        {"split": name, "file": _name(splits[name], name, i), "width": int(scans[name].records["width"][i]),
         "height": int(scans[name].records["height"][i])} for name, i in found[:MAX_LISTED]]}


def _counts(names: tuple[str, ...], scan: SplitScan, field: str = "mode") -> dict[str, int]:
    """{mode (or format): number of readable images}, most frequent first."""
    readable = scan.records[scan.records["status"] & STATUS_PROBLEM == 0]
    codes, counts = np.unique(readable[field], return_counts=True)
    pairs = sorted(zip(counts.tolist(), (names[c] or "?" for c in codes)), reverse=True)
    return {name: n for n, name in pairs}


def _exact_groups(scans: dict[str, SplitScan]) -> list[list[tuple[str, int]]]:
    """Groups of readable images with the same sha256, each a list of (split, index) in split order."""
    keys, members = [], []
    for name, scan in scans.items():
        readable = np.flatnonzero(scan.records["status"] & STATUS_PROBLEM == 0)
        keys.append(np.ascontiguousarray(scan.records["sha256"][readable]).view("V32").reshape(-1))
        members += [(name, int(i)) for i in readable]
    if not members:
        return []
    keys = np.concatenate(keys)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    groups: dict[int, list] = {}
    for k in repeated:
        groups.setdefault(int(inverse[k]), []).append(members[k])
    return list(groups.values())


def _duplicates(splits: dict, scans: dict[str, SplitScan], groups: list) -> dict:
    """Exact duplicate files inside one split and shared by several (leakage)."""
    def entry(members):
        return [{"split": s, "file": _name(splits[s], s, i), "label": splits[s].class_names[splits[s].labels[i]]}
                for s, i in members]

    within, across = [], []
    for members in groups:
        for split in {s for s, _ in members}:
            in_split = [m for m in members if m[0] == split]
            if len(in_split) > 1:
                files = entry(in_split)
                within.append({"split": split, "files": files, "labels_differ": len({f["label"] for f in files}) > 1})
        if len({s for s, _ in members}) > 1:
            across.append({"files": entry(members)})
    order = {name: k for k, name in enumerate(SPLITS)}
    within.sort(key=lambda g: (order.get(g["split"], 9), g["files"][0]["file"]))
    return {
        "within_split_groups": len(within), "within_split": within[:MAX_LISTED],
        "across_splits_groups": len(across), "across_splits": across[:MAX_LISTED],
    }


def _near_duplicates(splits: dict, scans: dict[str, SplitScan], max_distance: int) -> dict:
    """Pairs of images in different splits whose pHashes differ in <= max_distance of 64 bits
    (exact duplicates left out: they are reported as such)."""
    pairs = []
    names = [name for name in SPLITS if name in scans]
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1:]:
            ra, rb = scans[a].records, scans[b].records
            ia_all = np.flatnonzero(ra["status"] & STATUS_PROBLEM == 0)
            ib_all = np.flatnonzero(rb["status"] & STATUS_PROBLEM == 0)
            ia, ib, distance = near_pairs(ra["phash"][ia_all], rb["phash"][ib_all], max_distance)
            ia, ib = ia_all[ia], ib_all[ib]
            exact = np.all(ra["sha256"][ia] == rb["sha256"][ib], axis=1)
            pairs += [(int(d), a, int(i), b, int(j)) for i, j, d in zip(ia[~exact], ib[~exact], distance[~exact])]
    pairs.sort()
    return {"max_distance": max_distance, "pairs_found": len(pairs), "pairs": [
        {"distance": d, "a": {"split": a, "file": _name(splits[a], a, i)}, "b": {"split": b, "file": _name(splits[b], b, j)}}
        for d, a, i, b, j in pairs[:MAX_LISTED]]}


def near_pairs(a: np.ndarray, b: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every pair with popcount(a[i] ^ b[j]) <= max_distance; a, b: uint64 hashes.

    Multi-index hashing: cut the 64 bits into max_distance + 1 bands. Two hashes that close agree
    exactly on at least one band (pigeonhole), so only pairs sharing a band value are compared,
    not all len(a) * len(b).
    """
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    if not 0 <= max_distance < 64:
        raise ValueError(f"max_distance={max_distance} must be in [0, 63]")
    edges = np.linspace(0, 64, max_distance + 2).astype(int)
    found = []
    for low, high in zip(edges[:-1], edges[1:]):
        mask = np.uint64((1 << (high - low)) - 1)
        key_a, key_b = (a >> np.uint64(low)) & mask, (b >> np.uint64(low)) & mask
        order = np.argsort(key_a, kind="stable")
        start = np.searchsorted(key_a[order], key_b, "left")
        count = np.searchsorted(key_a[order], key_b, "right") - start
        for js in _blocks(count, limit=1 << 22):
            j = np.repeat(js, count[js])
            first = np.repeat(np.cumsum(count[js]) - count[js], count[js])
            i = order[np.repeat(start[js], count[js]) + np.arange(len(j)) - first]
            close = np.bitwise_count(a[i] ^ b[j]) <= max_distance
            found.append(i[close].astype(np.int64) * len(b) + j[close])
    keys = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    i, j = keys // max(len(b), 1), keys % max(len(b), 1)
    return i, j, np.bitwise_count(a[i] ^ b[j]).astype(np.int64)


def _blocks(count: np.ndarray, limit: int) -> list[np.ndarray]:
    """Consecutive runs of indices into `count` whose counts add up to about `limit` (bounded memory)."""
    ends = np.searchsorted(np.cumsum(count), np.arange(limit, int(count.sum()) + limit, limit), "right")
    bounds = np.unique(np.concatenate([[0], np.maximum(ends, 1), [len(count)]]))
    return [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def summary(report: dict, limit: int = 10) -> str:
    """The report as Markdown a person reads: the problems first, each with up to `limit` files."""
    root = report.get("root") or ""
    show = lambda f: os.path.relpath(f, root) if root and f.startswith(root + os.sep) else f  # noqa: E731
    images = ", ".join(f"{name} {n:,}" for name, n in report["images"].items())
    lines = [f"# Data check ({report['check']}): {report.get('data', '')}", "",
             f"{sum(report['images'].values()):,} images ({images}), "
             f"{len(report['class_counts']['train'])} classes, training crop {report['crop_size'] or 'none'}.", ""]
    for split, why in report["skipped_splits"].items():
        lines.append(f"Not scanned: {split} ({why}).")
    lines += ["", f"## Problems: {report['problems']}" if report["problems"] else "## No problems found", ""]

    def listing(title: str, items: list, total: int) -> None:
        if total:
            lines.append(f"- {title}:")
            lines.extend(f"  - {item}" for item in items[:limit])
            if total > min(limit, len(items)):
                lines.append(f"  - ... and {total - min(limit, len(items))} more (report.json)")

    listing(f"{len(report['unreadable'])} unreadable images",
            [f"{u['split']}: {show(u['file'])}: {u['reason']}" for u in report["unreadable"]], len(report["unreadable"]))
    exact = report.get("exact_duplicates")
    if exact:
        listing(f"{exact['within_split_groups']} groups of identical files inside a split",
                [f"{g['split']}: " + ", ".join(show(f["file"]) for f in g["files"])
                 + (" (labels differ: " + ", ".join(f["label"] for f in g["files"]) + ")" if g["labels_differ"] else "")
                 for g in exact["within_split"]], exact["within_split_groups"])
        listing(f"{exact['across_splits_groups']} files shared by several splits (leakage)",
                [", ".join(f"{f['split']}: {show(f['file'])}" for f in g["files"]) for g in exact["across_splits"]],
                exact["across_splits_groups"])
    near = report.get("near_duplicates")
    if near:
        listing(f"{near['pairs_found']} near-duplicate pairs across splits (pHash distance <= {near['max_distance']})",
                [f"{p['a']['split']}: {show(p['a']['file'])} ~ {p['b']['split']}: {show(p['b']['file'])} "
                 f"(distance {p['distance']})" for p in near["pairs"]], near["pairs_found"])
    if not exact:
        lines.append("- duplicates and near-duplicates: not looked for by the fast check (run the full check)")
    lines += ["", "## Worth knowing", ""]
    for split, balance in report["imbalance"].items():
        if balance["ratio"] is None:
            lines.append(f"- {split}: no images")
            continue
        missing = f"; no image of {balance['missing_classes']}" if balance["missing_classes"] else ""
        lines.append(f"- {split} classes: largest {balance['largest'][0]} ({balance['largest'][1]:,}), smallest "
                     f"{balance['smallest'][0]} ({balance['smallest'][1]:,}): imbalance {balance['ratio']:g}x{missing}")
    small = report["smaller_than_crop"]
    listing(f"{small['count']} images smaller than the training crop {report['crop_size']} (upsampled when training)",
            [f"{s['split']}: {show(s['file'])} ({s['width']}x{s['height']})" for s in small["files"]], small["count"])
    for split, modes in report["modes"].items():
        lines.append(f"- {split} colour modes: " + ", ".join(f"{m} {n:,}" for m, n in modes.items())
                     + ("" if set(modes) <= {"RGB"} else " (all become RGB when decoded)"))
    listing(f"{len(report['notes'])} readable files with a note",
            [f"{n['split']}: {show(n['file'])}: {n['note']}" for n in report["notes"]], len(report["notes"]))
    return "\n".join(lines) + "\n"
