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
trainer refuses. Reading goes through webdataset (`tarfile_samples`), which streams a tar from a path.

Remote folders: the same folder, uploaded as is, streams from a URL (`--train_data_dir s3://bucket/shards`,
`hf://datasets/org/repo/shards`, `gs://`, `memory://` in tests; anything with "://"), read through fsspec, so a
shard set larger than the disk trains without a local copy. shards.json is read from the URL; one listing of
the folder checks every listed shard is there and gives each its size and version (ETag, blob id, modification
time: whatever the backend's listing has), which is the fingerprint a resume must match, fixed when the index is
read. A tar is streamed from its URL (fsspec's file object through webdataset's tar_file_expander and
group_by_keys): the samples, keys and order a local copy gives. A URL without shards.json is refused: only shard
folders stream from a URL (a `datasets` dataset on the Hub streams with --dataset_name X --streaming).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from zeroconv.errors import UserError

INDEX = "shards.json"
UNFINISHED = "shards.json.unfinished"  # in place from before the first shard until the index is written
FORMAT = "zeroconv-webdataset-1"
IMAGE, CONDITION, CAPTION = "image", "conditioning_image.png", "txt"
DEFAULT_SHARD_SIZE = 1000
# the fsspec backend packages of the protocols a shard folder is commonly kept behind, for the pip install fix
BACKEND_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                    "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp", "hf": "huggingface_hub"}
# what a listing entry says about a file's version, by backend (s3fs, gcsfs, HfFileSystem, http, local, memory);
# every key present goes into the fingerprint, so any of them changing is a changed shard
VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "blob_id", "lfs", "Last-Modified", "Content-MD5", "Digest",
                "LastModified", "last_modified", "updated", "mtime", "created")


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

    folder: Path | str  # a local folder, or a URL (is_url) read through fsspec
    shards: tuple[Shard, ...]
    stamps: tuple[str, ...] = ()  # a URL's: each shard's size and version, from the listing read_index made

    unit = "shards"
    more_shards = "prepare smaller shards (--shard_size)"

    @property
    def where(self) -> str:
        return f"--train_data_dir {self.folder}"

    @property
    def remote(self) -> bool:
        return is_url(self.folder)

    def path(self, shard: Shard) -> Path | str:
        return f"{self.folder}/{shard.name}" if self.remote else self.folder / shard.name

    def read(self, shard: Shard) -> Iterator[dict]:
        return read_remote_shard(self.path(shard), self.where) if self.remote else read_shard(self.path(shard))

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
        """The shards' names, counts, sizes and mtimes (a URL's: sizes and versions as its listing gave them when
        the index was read): a resumed stream must read the shards it started on."""
        digest = hashlib.sha256()
        for number, shard in enumerate(self.shards):
            if self.remote:
                stamp = self.stamps[number]
            else:
                stat = os.stat(self.path(shard))
                stamp = f"{stat.st_size}|{stat.st_mtime_ns}"
            digest.update(f"{shard.name}|{shard.samples}|{shard.first_index}|{stamp}".encode())
        return digest.hexdigest()[:32]


def is_url(folder: str | os.PathLike) -> bool:
    """Whether --train_data_dir names a remote folder (read through fsspec) rather than a local path."""
    return "://" in str(folder)


def is_shard_folder(folder: str | os.PathLike | None) -> bool:
    """Whether `folder` (a path, or a URL) holds a shards.json; False for a URL that cannot be reached, which
    read_index then names."""
    if folder is None:
        return False
    if is_url(folder):
        try:
            fs, path = remote_fs(str(folder), "")
            return fs.isfile(posixpath.join(path, INDEX))
        except (UserError, OSError, ValueError):
            return False
    return (Path(folder) / INDEX).is_file()


def is_unfinished(folder: Path) -> bool:
    """Whether a `zeroconv prepare --format webdataset` into `folder` stopped before its index."""
    return (folder / UNFINISHED).exists() or (not (folder / INDEX).is_file() and any(folder.glob("shard-*.tar")))


def read_index(folder: Path | str, flag: str) -> ShardIndex:
    """The folder's shards.json, checked against the tars it names; a UserError naming the fix otherwise. A URL
    (is_url) is read through fsspec: read_remote_index."""
    if is_url(folder):
        return read_remote_index(str(folder).rstrip("/"), flag)
    where = f"{flag} {folder}: {INDEX}"
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{where} is unreadable ({exc}); run `zeroconv prepare --format webdataset` again") from None
    return parse_index(index, folder, flag, lambda shard: (folder / shard.name).is_file())


def parse_index(index, folder: Path | str, flag: str, exists,
                copy: str = "copy every shard the index lists, or prepare again") -> ShardIndex:
    """The ShardIndex of a loaded shards.json, each listed shard checked by `exists(shard)` (`copy`: the fix for
    one that is missing)."""
    where = f"{flag} {folder}: {INDEX}"
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{where}: not a zeroconv shard index (format {FORMAT!r} expected); write the shards with "
                        "`zeroconv prepare --format webdataset`")
    shards, expected = [], 0
    for entry in index.get("shards", []):
        shard = Shard(entry["name"], int(entry["samples"]), int(entry["first_index"]))
        if shard.first_index != expected or shard.samples < 1:
            raise UserError(f"{where}: shard {shard.name} starts at index {shard.first_index}, expected {expected}; "
                            "the index was edited, run `zeroconv prepare --format webdataset` again")
        if not exists(shard):
            raise UserError(f"{where} lists {shard.name}, which is missing; {copy}")
        shards.append(shard)
        expected += shard.samples
    if not shards:
        raise UserError(f"{where} lists no shards")
    return ShardIndex(folder, tuple(shards))


def remote_fs(url: str, flag: str):
    """(fsspec filesystem, path in it) of a URL; a UserError naming the package to install where its backend is
    missing."""
    import fsspec.core

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package = BACKEND_PACKAGES.get(protocol)
        fix = f"pip install {package}" if package else f"install it ({exc})"
        raise UserError(f"{flag} {url}: fsspec has no {protocol}:// backend installed; {fix}") from None
    except ValueError as exc:  # fsspec: "Protocol not known"
        raise UserError(f"{flag} {url}: {exc}; give a local folder or a URL fsspec reads (s3://, gs://, hf://, "
                        "https://, ...)") from None


def read_remote_index(url: str, flag: str) -> ShardIndex:
    """The shards.json of a shard folder behind a URL, its shards checked and stamped by one listing of the
    folder. A shard the listing lacks, or lists without a size, is looked up on its own (fs.info) before it counts
    as missing: a plain https server lists a folder only where it serves an index page, and then without sizes or
    versions (fsspec's HTTPFileSystem reads them from a HEAD request)."""
    fs, root = remote_fs(url, flag)
    where = f"{flag} {url}"
    try:
        index = json.loads(fs.cat_file(posixpath.join(root, INDEX)).decode("utf-8"))
    except FileNotFoundError:
        raise not_a_shard_folder(fs, root, where) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: {INDEX} is unreadable ({describe(exc)}); check the URL, your access to it (the "
                        "backend's credentials) and the connection") from None
    fs.invalidate_cache(root)  # a listing cached earlier in this process would fingerprint what was there then
    try:
        listing = {posixpath.basename(entry["name"].rstrip("/")): entry for entry in fs.ls(root, detail=True)}
    except (FileNotFoundError, NotImplementedError):
        listing = {}
    except OSError as exc:
        raise UserError(f"{where}: cannot list the folder ({describe(exc)}); check your access to it") from None
    stamps = {}

    def exists(shard: Shard) -> bool:
        entry = listing.get(shard.name)
        if entry is None or entry.get("size") is None:
            try:
                entry = fs.info(posixpath.join(root, shard.name))
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise UserError(f"{where}: cannot look up {shard.name} ({describe(exc)})") from None
        stamps[shard.name] = version_stamp(entry)
        return entry.get("type", "file") == "file"

    parsed = parse_index(index, url, flag, exists, "upload every shard the index lists (the prepared folder as is), "
                         "or prepare and upload again")
    return ShardIndex(url, parsed.shards, tuple(stamps[shard.name] for shard in parsed.shards))


def version_stamp(entry: dict) -> str:
    """A listing entry's size and every version field it has (VERSION_KEYS), as one string."""
    return json.dumps([entry.get("size")] + [[key, entry[key]] for key in VERSION_KEYS if entry.get(key) is not None],
                      default=str)


def not_a_shard_folder(fs, root: str, where: str) -> UserError:
    """The error for a URL without shards.json: an unfinished prepare or upload where shards lie there."""
    try:
        names = [posixpath.basename(name.rstrip("/")) for name in fs.ls(root, detail=False)]
    except (OSError, NotImplementedError):
        names = []
    if UNFINISHED in names or any(name.startswith("shard-") and name.endswith(".tar") for name in names):
        return UserError(f"{where}: shards but no {INDEX}, the index `zeroconv prepare --format webdataset` writes "
                         f"after its last shard: the prepare did not finish, or the upload is incomplete; finish the "
                         f"prepare, or upload {INDEX} after the shards")
    return UserError(f"{where}: no {INDEX}, so not a webdataset shard folder; only the folder `zeroconv prepare "
                     "--format webdataset` writes streams from a URL (upload it as is), a `datasets` dataset streams "
                     "with --dataset_name X --streaming, and other layouts train from a local --train_data_dir")


def describe(exc: BaseException) -> str:
    """An exception's type and first line, for one-line messages (webdataset appends its stream to exc.args)."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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


def read_remote_shard(url: str, where: str) -> Iterator[dict]:
    """read_shard of a tar behind a URL: streamed through fsspec, the same samples in the same order (a generator:
    closing it closes the remote file)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    fs, path = remote_fs(url, where)
    try:
        fh = fs.open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{where}: {url} is gone (it was there when the run read shards.json); upload every shard "
                        "shards.json lists again") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot open {url} ({describe(exc)}); check your access and the connection, and "
                        "resume from the last checkpoint") from None
    with fh:
        try:
            yield from group_by_keys(tar_file_expander([{"url": url, "stream": fh}]))
        except OSError as exc:
            raise UserError(f"{where}: reading {url} failed ({describe(exc)}); check the connection, and resume from "
                            "the last checkpoint") from None


def sample_fields(sample: dict) -> tuple[bytes, bytes, str]:
    """(image bytes, conditioning image bytes, caption) of one shard sample."""
    image = next((value for key, value in sample.items() if key.startswith(IMAGE + ".")), None)
    condition = sample.get(CONDITION)
    if image is None or condition is None:
        raise ValueError(f"sample {sample.get('__key__')} lacks its {IMAGE}.* or {CONDITION} member")
    return image, condition, sample.get(CAPTION, b"").decode("utf-8")
