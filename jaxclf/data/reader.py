"""Reading a record and decoding its image, in the grain worker; an unreadable image stops the run or is replaced.

Replacing inside the source keeps every batch full and makes the same index always give the same
example, so a resumed run still sees exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from collections.abc import Callable

import grain
import numpy as np

from jaxclf.config import ConfigError
from jaxclf.data import allocator
from jaxclf.data.ops import BadImage, Decode, InceptionCrop
from jaxclf.data.sources import DataError

BAD_IMAGE_MODES = ("error", "skip")
MAX_CONSECUTIVE_BAD = 100

_warned: set[str] = set()  # files this process already warned about


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedSource:
    """`source` with `decode` applied to each record as it is read.

    With bad_images="skip", a record whose image cannot be decoded is replaced by the next readable
    one (i + 1, i + 2, ..., wrapping round) and a warning names the file once per process.
    Training examples (`mask_replaced=False`) carry "skipped": int32, the number of records passed
    over; evaluation examples (`mask_replaced=True`) get mask=False instead, so no image counts twice.
    """

    source: object
    decode: Decode
    bad_images: str = "error"
    mask_replaced: bool = False

    def __post_init__(self):
        if self.bad_images not in BAD_IMAGE_MODES:
            raise ConfigError(f"config.data.bad_images={self.bad_images!r}: use one of {BAD_IMAGE_MODES}")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        return self.read(i, self.decode.map)

    def read(self, i: int, decode: Callable[[dict], dict]) -> dict:
        """Record i passed through `decode` (a record -> example function that raises BadImage), with
        unreadable records replaced as above."""
        if multiprocessing.parent_process() is not None:  # a worker's first record (once per process);
            allocator.reuse_freed_memory()  # not the training process: XLA's buffers would fragment the kept heap
        tries = min(len(self.source), MAX_CONSECUTIVE_BAD)
        for k in range(tries):
            try:
                example = decode(self.source[(i + k) % len(self.source)])
            except BadImage as e:
                if self.bad_images == "error":
                    raise DataError(f"{e}; to skip unreadable images, set config.data.bad_images='skip'") from None
                if e.name not in _warned:
                    _warned.add(e.name)
                    print(f"warning: skipping an unreadable image: {e}", file=sys.stderr)
                continue
            if self.mask_replaced:
                if k:
                    example["mask"] = False
            else:
                example["skipped"] = np.int32(k)
            return example
        raise DataError(f"{tries} records in a row from index {i} of {self.source!r} cannot be decoded; see the warnings above")

    def __repr__(self) -> str:
        # Part of grain's iterator state: it must not change between a run and its resumption.
        return f"DecodedSource({self.source!r}, {self.decode!r}, bad_images={self.bad_images!r})"


@dataclasses.dataclass(frozen=True, eq=False)
class RecordIndices:
    """The record indices 0 .. len(reader) - 1, as grain's data source when an op reads the records itself."""

    reader: DecodedSource

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> int:
        return i

    def __repr__(self) -> str:
        # grain checks it on restoring an iterator state: the records and their order are the
        # reader's, so a run saved before the crop moved into decoding resumes at the same place.
        return repr(self.reader)


@dataclasses.dataclass(frozen=True, eq=False)
class ReadWithCrop(grain.transforms.RandomMap):
    """Reads record i of `reader` and decodes it together with `crop` (the op after `decode`), which
    needs the record's randomness to choose how much of the JPEG to decode: the training loader's
    first op over `RecordIndices(reader)`; unreadable images are replaced as by `reader`."""

    reader: DecodedSource
    crop: InceptionCrop

    def random_map(self, i: int, rng: np.random.Generator) -> dict:
        return self.reader.read(i, lambda record: self.crop.crop_while_decoding(record, rng, self.reader.decode.max_pixels))
