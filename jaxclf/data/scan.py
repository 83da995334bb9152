"""Reading every image of every split for the data check: one compact record per image, in parallel.

Two depths. `full=False` (the fast check) reads file headers and end markers (headers.py) in a
thread pool: the work is a few small reads per file, so threads overlap the waits on storage and
nothing forks a process that already runs JAX. `full=True` decodes every image through the
split's own `decode` op (the reader training uses), hashes its bytes (sha256) and its pixels (a
perceptual hash, imagehash's pHash), in worker processes started with "spawn" as grain's are.

With several JAX processes each reads an interleaved shard (index % count == process index) and
the records are gathered, so every process ends with the same result for the whole data set.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import multiprocessing

import imagehash
import numpy as np
from PIL import Image

from jaxclf.tracking import progress
from jaxclf.data import headers
from jaxclf.data.ops import BadImage, Decode, TooManyPixels, as_pil
from jaxclf.data.sources import LabelledFiles

# Mode and format names are stored as codes into these fixed lists, the same in every process. (Not
# Image.OPEN: filling it means Image.init(), after which Image.open tries every plugin, IM and IMT
# before JPEG, in this process: 3x slower.)
MODES = ("", *Image.MODES, "other")
FORMATS = ("", "BMP", "GIF", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP", "TFDS", "other")

STATUS_PROBLEM, STATUS_NOTE = 1, 2
RECORD = np.dtype([
    ("num_bytes", "<i8"), ("width", "<i4"), ("height", "<i4"), ("mode", "<i2"), ("format", "<i2"),
    ("status", "u1"),  # bit STATUS_PROBLEM: unreadable; bit STATUS_NOTE: accepted, with a note
    ("phash", "<u8"),  # full only: 64-bit pHash of the decoded image
    ("sha256", "u1", (32,)),  # full only: of the file's bytes (of the decoded pixels for TFDS records)
])
CHUNK = 256  # images per task: large enough to amortise the hand-off, small enough for a live bar
_PHASH_SIDE = 64  # images are box-reduced to about this before pHash's own 32 x 32 resize


@dataclasses.dataclass
class SplitScan:
    """What the scan found in one split: `records[i]` (RECORD) for the source's i-th image, and the
    reasons of the flagged ones, keyed by index."""

    records: np.ndarray
    problems: dict[int, str]  # unreadable: why
    notes: dict[int, str]  # readable, but worth knowing (e.g. data after a JPEG's end marker)


@dataclasses.dataclass(frozen=True)
class _Split:
    """What a worker needs to read one split: the source itself only where records are not files (TFDS)."""

    decode: Decode
    source: object | None


def scan(
    splits: dict,
    decodes: dict[str, Decode],
    *,
    full: bool,
    workers: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, SplitScan]:
    """Records for every image of every split; `decodes[split]` is the decode op training applies to it.

    `workers`: threads (fast) or processes (full), 0 for this thread alone. The fast check needs
    file sources (their records have paths).
    """
    readers = {}
    for name, source in splits.items():
        is_files = isinstance(source, LabelledFiles)
        if not (full or is_files):
            raise ValueError(f"the fast check reads file headers; split {name!r} ({source!r}) has no files")
        readers[name] = _Split(decodes[name], None if is_files else source)
    tasks = []
    for name, source in splits.items():
        mine = np.arange(process_index, len(source), process_count)
        for start in range(0, len(mine), CHUNK):
            indices = mine[start:start + CHUNK]
            paths = [source.paths[i] for i in indices] if readers[name].source is None else None
            tasks.append((name, indices, paths))
    kind = "decoding" if full else "reading headers of"
    local = _run(tasks, readers, full, workers, f"{kind} {sum(len(t[1]) for t in tasks)} images")
    results = {name: SplitScan(np.zeros(len(source), RECORD), {}, {}) for name, source in splits.items()}
    for name, indices, records, problems, notes in local:
        results[name].records[indices] = records
        results[name].problems.update(problems)
        results[name].notes.update(notes)
    if process_count > 1:
        _gather(results, splits, readers, full, process_index, process_count)
    return results


def _run(tasks: list, readers: dict, full: bool, workers: int, description: str) -> list:
    """Each task's result, in any order, with a bar counting images."""
    results = []
    with progress.bar(description, total=sum(len(t[1]) for t in tasks), unit="img") as bar:
        if workers == 0:
            for task in tasks:
                results.append(_scan_chunk(readers, full, *task))
                bar.update(len(task[1]))
            return results
        if full:
            # Workers fork from a fresh server process that imported this module once, so each costs
            # a fork, not an import of jaxclf and JAX; the server never ran JAX, so forking it is safe.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                          initargs=(readers,))
            submit = lambda task: pool.submit(_scan_chunk_in_worker, full, *task)  # noqa: E731
        else:
            pool = concurrent.futures.ThreadPoolExecutor(workers)
            submit = lambda task: pool.submit(_scan_chunk, readers, full, *task)  # noqa: E731
        with pool:
            for future in concurrent.futures.as_completed([submit(task) for task in tasks]):
                results.append(future.result())
                bar.update(len(results[-1][1]))
    return results


_worker_readers: dict[str, _Split] = {}


def _init_worker(readers: dict[str, _Split]) -> None:
    _worker_readers.update(readers)


def _scan_chunk_in_worker(full: bool, name: str, indices: np.ndarray, paths: list[str] | None):
    return _scan_chunk(_worker_readers, full, name, indices, paths)


def _scan_chunk(readers: dict[str, _Split], full: bool, name: str, indices: np.ndarray, paths: list[str] | None):
    """(split, indices, RECORD[n], {index: problem}, {index: note}) for one task."""
    reader = readers[name]
    records = np.zeros(len(indices), RECORD)
    problems, notes = {}, {}
    for k, index in enumerate(indices):
        if paths is None:
            problem, note = _read_record(reader, int(index), records[k])
        else:
            problem, note = _read_file(paths[k], reader.decode, full, records[k])
        if problem:
            problems[int(index)] = problem
            records[k]["status"] |= STATUS_PROBLEM
        if note:
            notes[int(index)] = note
            records[k]["status"] |= STATUS_NOTE
    return name, indices, records, problems, notes


def _read_file(path: str, decode: Decode, full: bool, record) -> tuple[str | None, str | None]:
    """Fill `record` for the image file at `path`; return (problem, note).

    Fast: the header, and a decode only for a file that lacks its format's ending (headers.py), to
    tell a truncated file from one with data after the image. Full: always decode (the verdict is
    the decode op's), then hash the bytes and the pixels.
    """
    header = headers.read_header(path)
    record["num_bytes"], record["width"], record["height"] = header.num_bytes, header.width, header.height
    record["mode"], record["format"] = _code(MODES, header.mode), _code(FORMATS, header.format)
    if header.problem and not full:
        return header.problem, None
    if header.width * header.height > decode.max_pixels:  # what decoding would refuse, told from the header
        return TooManyPixels(path, header.width, header.height, decode.max_pixels).reason, None
    if not (full or header.suspect):
        return None, None
    try:
        image = decode.map({"path": path})["image"]
    except BadImage as e:
        # The header's words are plainer ("empty file") where it saw the problem first.
        reason = header.problem or (f"{header.suspect}; {e.reason}" if header.suspect else e.reason)
        return reason, None
    note = f"{header.suspect}, yet it decodes (data after the image?)" if header.suspect else None
    if full:
        with open(path, "rb") as f:
            record["sha256"] = np.frombuffer(hashlib.sha256(f.read()).digest(), np.uint8)
        record["phash"] = perceptual_hash(image)
    return None, note


def _read_record(reader: _Split, index: int, record) -> tuple[str | None, None]:
    """Fill `record` for a source's record that holds a decoded image (TFDS); return (problem, None)."""
    try:
        example = reader.source[index]
        original = np.asarray(example["image"])
        image = reader.decode.map(example)["image"]
    except Exception as e:  # noqa: BLE001  whatever TFDS raises for a record it cannot decode is the finding
        return f"cannot read record {index} ({type(e).__name__}: {e})", None
    channels = 1 if original.ndim == 2 else original.shape[-1]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels, "other") if original.dtype == np.uint8 else "I;16"
    record["height"], record["width"] = original.shape[:2]
    record["mode"], record["format"] = _code(MODES, mode), _code(FORMATS, "TFDS")
    digest = hashlib.sha256(str(original.shape).encode() + original.tobytes()).digest()
    record["sha256"] = np.frombuffer(digest, np.uint8)
    record["phash"] = perceptual_hash(image)
    return None, None


def perceptual_hash(image) -> int:
    """imagehash's 64-bit pHash of an RGB image (PIL or uint8[H, W, 3]), as an unsigned int.

    A large image is first box-reduced to about 64 px: pHash resizes to 32 x 32 anyway, and the
    antialiased resize of a full photo would cost more than decoding it.
    """
    image = as_pil(image)
    factor = min(image.size) // _PHASH_SIDE
    if factor > 1:
        image = image.reduce(factor)
    return int.from_bytes(np.packbits(imagehash.phash(image).hash).tobytes(), "big")


def _code(names: tuple[str, ...], name: str | None) -> int:
    if name is None:
        return 0
    return names.index(name) if name in names else len(names) - 1


def _gather(results: dict[str, SplitScan], splits: dict, readers: dict, full: bool,
            process_index: int, process_count: int) -> None:
    """Complete each process's shard of `results` with every other process's, in place.

    The records travel as bytes (one all-gather per split); the reasons of flagged images of other
    shards are read again here, which gives the same words: reading is deterministic.
    """
    from jax.experimental import multihost_utils  # only multi-process runs need it

    for name, source in splits.items():
        result = results[name]
        rows = -(-len(source) // process_count)  # ceil: the largest shard
        mine = np.zeros(rows, RECORD)
        own = result.records[process_index::process_count]
        mine[:len(own)] = own
        gathered = np.asarray(multihost_utils.process_allgather(mine.view(np.uint8).reshape(rows, RECORD.itemsize)))
        # Shard p's row j is index j * count + p.
        everything = gathered.transpose(1, 0, 2).reshape(rows * process_count, RECORD.itemsize)
        result.records[:] = everything.copy().view(RECORD).reshape(-1)[:len(source)]
        flagged = np.flatnonzero(result.records["status"])
        others = flagged[flagged % process_count != process_index]
        if len(others):
            paths = [source.paths[i] for i in others] if readers[name].source is None else None
            _, _, _, problems, notes = _scan_chunk(readers, full, name, others, paths)
            result.problems.update(problems)
            result.notes.update(notes)
