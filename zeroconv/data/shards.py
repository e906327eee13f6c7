"""The webdataset shard format of `zeroconv prepare --format webdataset`, read by `zeroconv train --train_data_dir`.

A shard folder holds tar shards (webdataset's layout: the members of one sample share a key) and one index:

    shard-000000.tar ...      sample k: {key}.image.{png|jpg|webp}, {key}.conditioning_image.png, {key}.txt
    shards.json               {"format", "samples", "shards": [{"name", "samples", "first_index"}, ...]}

A sample's key is its global index in the dataset (first_index of its shard + its position in the shard), the
index every per-sample draw is seeded by (zeroconv.data.dataset, zeroconv.models.draws), so a streamed sample
draws the same numbers whichever rank, worker or epoch position it lands in. The index gives the trainer the shard
count and the epoch length without opening a tar.

Completeness: each shard is written under a temporary name and renamed into place once closed, and the index is
written (atomically) only after the last shard; shards.json.unfinished marks the folder from before the first
shard until then. A folder with the marker, or with shards and no index, is an unfinished prepare, which the
trainer refuses. Reading goes through webdataset (`tarfile_samples`), which streams a tar from a path or a URL.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from zeroconv.errors import UserError

INDEX = "shards.json"
UNFINISHED = "shards.json.unfinished"  # in place from before the first shard until the index is written
FORMAT = "zeroconv-webdataset-1"
IMAGE, CONDITION, CAPTION = "image", "conditioning_image.png", "txt"
DEFAULT_SHARD_SIZE = 1000


@dataclass(frozen=True)
class Shard:
    name: str  # file name in the folder
    samples: int
    first_index: int  # global index of its first sample


@dataclass(frozen=True)
class ShardIndex:
    """A webdataset shard set, as zeroconv.data.stream reads it. A stream's source is any object with these
    members (zeroconv.data.datafiles.DataFileIndex is the other: the parquet files of a `datasets` dataset):
    `shards`, `where` (the flag and location, for messages), `unit` and `more_shards` (what a shard is
    called and how to get more), `read(shard)` (its raw samples, in order), `fields(sample)` ((image, conditioning
    image or None, caption); ValueError if it lacks one), `wrong_count(shard, found)` (the error for a shard that
    holds another number of samples than listed), `fingerprint()` and `identity()` (what a resume must match)."""

    folder: Path
    shards: tuple[Shard, ...]

    unit = "shards"
    more_shards = "prepare smaller shards (--shard_size)"

    @property
    def where(self) -> str:
        return f"--train_data_dir {self.folder}"

    def path(self, shard: Shard) -> Path:
        return self.folder / shard.name

    def read(self, shard: Shard) -> Iterator[dict]:
        return read_shard(self.path(shard))

    @staticmethod
    def fields(sample: dict) -> tuple[bytes, bytes, str]:
        return sample_fields(sample)

    def wrong_count(self, shard: Shard, found: int) -> UserError:
        return UserError(f"{self.where}: {shard.name} holds {found} samples, its index says {shard.samples}; the "
                         "shard is truncated, prepare it again")

    def identity(self) -> dict:
        """Run-identity keys (zeroconv.train.setup.run_identity): none, a shard set is checked by its fingerprint."""
        return {}

    def fingerprint(self) -> str:
        """The shards' names, counts, sizes and mtimes: a resumed stream must read the shards it started on."""
        digest = hashlib.sha256()
        for shard in self.shards:
            stat = os.stat(self.path(shard))
            digest.update(f"{shard.name}|{shard.samples}|{shard.first_index}|{stat.st_size}|{stat.st_mtime_ns}"
                          .encode())
        return digest.hexdigest()[:32]


def is_shard_folder(folder: str | os.PathLike | None) -> bool:
    return folder is not None and (Path(folder) / INDEX).is_file()


def is_unfinished(folder: Path) -> bool:
    """Whether a `zeroconv prepare --format webdataset` into `folder` stopped before its index."""
    return (folder / UNFINISHED).exists() or (not (folder / INDEX).is_file() and any(folder.glob("shard-*.tar")))


def read_index(folder: Path, flag: str) -> ShardIndex:
    """The folder's shards.json, checked against the tars it names; a UserError naming the fix otherwise."""
    where = f"{flag} {folder}: {INDEX}"
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{where} is unreadable ({exc}); run `zeroconv prepare --format webdataset` again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{where}: not a zeroconv shard index (format {FORMAT!r} expected); write the shards with "
                        "`zeroconv prepare --format webdataset`")
    shards, expected = [], 0
    for entry in index.get("shards", []):
        shard = Shard(entry["name"], int(entry["samples"]), int(entry["first_index"]))
        if shard.first_index != expected or shard.samples < 1:
            raise UserError(f"{where}: shard {shard.name} starts at index {shard.first_index}, expected {expected}; "
                            "the index was edited, run `zeroconv prepare --format webdataset` again")
        if not (folder / shard.name).is_file():
            raise UserError(f"{where} lists {shard.name}, which is missing; copy every shard the index lists, or "
                            "prepare again")
        shards.append(shard)
        expected += shard.samples
    if not shards:
        raise UserError(f"{where} lists no shards")
    return ShardIndex(folder, tuple(shards))


def write_shard(path: Path, samples: Iterable[dict], tmp_dir: Path) -> int:
    """Write one tar of `samples` ({"__key__", member suffix: bytes}) so that `path` either does not exist or is
    complete; returns the sample count."""
    import webdataset

    tmp = tmp_dir / f"{os.getpid()}-{path.name}"
    count = 0
    with open(tmp, "wb") as fh:
        with webdataset.TarWriter(fh) as writer:
            for sample in samples:
                writer.write(sample)
                count += 1
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return count


def write_index(folder: Path, shards: list[Shard], tmp_dir: Path) -> None:
    index = {"format": FORMAT, "samples": sum(s.samples for s in shards),
             "shards": [{"name": s.name, "samples": s.samples, "first_index": s.first_index} for s in shards]}
    tmp = tmp_dir / f"{os.getpid()}-{INDEX}"
    tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    os.replace(tmp, folder / INDEX)
    (folder / UNFINISHED).unlink(missing_ok=True)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def read_shard(path: Path) -> Iterator[dict]:
    """The samples of one tar, in order, as webdataset groups them ({"__key__", suffix: bytes})."""
    from webdataset.tariterators import tarfile_samples

    return tarfile_samples([{"url": str(path)}])


def sample_fields(sample: dict) -> tuple[bytes, bytes, str]:
    """(image bytes, conditioning image bytes, caption) of one shard sample."""
    image = next((value for key, value in sample.items() if key.startswith(IMAGE + ".")), None)
    condition = sample.get(CONDITION)
    if image is None or condition is None:
        raise ValueError(f"sample {sample.get('__key__')} lacks its {IMAGE}.* or {CONDITION} member")
    return image, condition, sample.get(CAPTION, b"").decode("utf-8")
