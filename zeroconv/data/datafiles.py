"""The parquet files of a `datasets` dataset as stream shards: `zeroconv train --dataset_name X --streaming`.

zeroconv.data.stream streams these through the machinery it streams webdataset shards with: a shard here is one
data file of the dataset's train split, in the order datasets' data-file resolution lists them (the order
`load_dataset` would concatenate them in), and a sample is one row. Nothing is downloaded whole:

- Listing: the files come from datasets' builder (`load_dataset_builder`: the hub's file listing at a commit, or a
  local folder's files); their row counts from each parquet file's footer (`pyarrow.parquet.read_metadata`,
  a few kilobytes at the end of the file, through fsspec: `hf://` URLs by huggingface_hub's HfFileSystem). So the
  epoch length and every process's step count are known before a row is read. Formats whose row count is not
  in a footer (json, csv, imagefolder, arrow, webdataset tars of the Hub) are refused (zeroconv.data.sources).
- A sample's global index, which seeds its per-sample draws, is its row position across the ordered file list:
  row r of file k is sum(rows of files 0..k-1) + r, the index the same row has when the dataset is loaded whole.
- Reading a shard: the file's row groups in order (`ParquetFile.iter_batches`), only the image, conditioning
  image and caption columns, stopping after the last row the stream needs; image cells stay undecoded (datasets'
  Image feature stores {"bytes", "path"}) until the sample leaves the shuffle buffer.
- Resume: the stream's layout carries `fingerprint()` (dataset, files, row counts; size and mtime of local
  files), so a mid-epoch resume reads the files it started on or is refused; `identity()` goes into the run's
  identity, so a checkpoint resumes only on the same dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

from zeroconv.data.shards import Shard
from zeroconv.errors import UserError

ROWS_PER_READ = 16  # rows decoded from arrow into Python at a time (a row group is read whole by pyarrow)
FOOTER_THREADS = 16  # parallel footer reads: one small range request each on the Hub


def caption_value(value) -> str | list[str]:
    """A caption cell as training reads it: a string, or a list of strings to draw one from."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return str(value)


def is_local(path: str) -> bool:
    return "://" not in path


def read_footer(path: str) -> tuple[int, list[str]]:
    """(rows, column names) of one parquet file, from its footer only."""
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as fh:
        metadata = pq.read_metadata(fh)
    return metadata.num_rows, list(metadata.schema.to_arrow_schema().names)


def read_footers(paths: list[str], where: str) -> list[tuple[int, list[str]]]:
    from concurrent.futures import ThreadPoolExecutor

    def one(path: str) -> tuple[int, list[str]]:
        try:
            return read_footer(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise UserError(f"{where}: cannot read the parquet footer of {path} ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); check the file, or drop --streaming") \
                from None

    if len(paths) == 1 or all(is_local(p) for p in paths):
        return [one(path) for path in paths]
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return list(pool.map(one, paths))


@dataclass(frozen=True)
class DataFileIndex:
    """The parquet files of a dataset's train split, as a stream source (the members zeroconv.data.shards.ShardIndex
    lists). A shard's name is the file's path or URL, its count the footer's row count."""

    dataset: str  # --dataset_name: a hub id, or the resolved local path
    config: str | None
    shards: tuple[Shard, ...]
    columns: tuple[str, str | None, str]  # the image, conditioning image (None with --condition) and caption columns

    unit = "parquet files"
    more_shards = ("write the dataset as more, smaller parquet files (or as webdataset shards: `zeroconv prepare "
                   "--format webdataset --shard_size`)")

    @property
    def where(self) -> str:
        return f"--dataset_name {self.dataset} --streaming"

    def read(self, shard: Shard) -> Iterator[dict]:
        """The rows of one file, in order, with the three columns only (a generator: closing it closes the file)."""
        import fsspec
        import pyarrow.parquet as pq

        with fsspec.open(shard.name, "rb") as fh:
            parquet = pq.ParquetFile(fh)
            for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=[c for c in self.columns if c]):
                yield from batch.to_pylist()

    def fields(self, row: dict) -> tuple:
        image, condition, caption = self.columns
        if row.get(image) is None or (condition is not None and row.get(condition) is None):
            raise ValueError(f"no {image if row.get(image) is None else condition} in this row")
        return row[image], None if condition is None else row[condition], caption_value(row.get(caption))

    def wrong_count(self, shard: Shard, found: int) -> UserError:
        return UserError(f"{self.where}: {shard.name} holds {found} rows, its footer said {shard.samples} when the run "
                         "started; the file changed under the run: start it again (a resume needs the files it "
                         "started on)")

    def fingerprint(self) -> str:
        """The dataset, its files (a hub URL names the commit), row counts, and local files' sizes and mtimes: a
        resumed stream must read the files it started on."""
        digest = hashlib.sha256(json.dumps([self.dataset, self.config, list(self.columns)]).encode())
        for shard in self.shards:
            stamp = ""
            if is_local(shard.name):
                stat = os.stat(shard.name)
                stamp = f"|{stat.st_size}|{stat.st_mtime_ns}"
            digest.update(f"{shard.name}|{shard.samples}|{shard.first_index}{stamp}".encode())
        return digest.hexdigest()[:32]

    def identity(self) -> dict:
        """Run-identity keys: a checkpoint of a streamed dataset resumes on that dataset only."""
        return {"streamed_dataset": {"dataset": self.dataset, "config": self.config, "split": "train"}}


def data_file_index(dataset: str, config: str | None, files: list[str], counts: list[tuple[int, list[str]]],
                    columns: tuple[str, str | None, str], where: str) -> DataFileIndex:
    """The index of `files` (in order) whose footers gave `counts`; each must hold the columns read. Files without
    rows are left out (a shard of no samples streams nothing)."""
    shards, first = [], 0
    for path, (rows, names) in zip(files, counts):
        missing = [c for c in columns if c is not None and c not in names]
        if missing:
            raise UserError(f"{where}: {path} has no column {', '.join(missing)} (its columns: {', '.join(names)}); "
                            "every data file needs the columns read")
        if rows:
            shards.append(Shard(path, rows, first))
            first += rows
    if not shards:
        raise UserError(f"{where}: its parquet files hold no rows")
    return DataFileIndex(dataset, config, tuple(shards), columns)
