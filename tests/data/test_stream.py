"""webdataset shards: `zeroconv prepare --format webdataset` writes them, zeroconv.data.stream streams them
(issue 16)."""

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from zeroconv.data import shards, stream
from zeroconv.errors import UserError


def write_photos(folder: Path, n: int, size: int = 64) -> None:
    from tests.data.conditions.photos import photo

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(size, size, seed=i).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"photo {i}")


def prepare_shards(tmp_path: Path, n: int, shard_size: int, *flags) -> Path:
    from zeroconv.config import parse
    from zeroconv.data.prepare import PrepareConfig, prepare

    images, out = tmp_path / "photos", tmp_path / "shards"
    if not images.is_dir():
        write_photos(images, n)
    cfg = parse(PrepareConfig, ["--images", str(images), "--out", str(out), "--condition", "canny", "--resolution",
                                "64", "--num_proc", "1", "--preview", "0", "--format", "webdataset", "--shard_size",
                                str(shard_size), *flags], prog="zeroconv prepare")
    prepare(cfg)
    return out


def tiny_shards(folder: Path, counts: list[int]) -> shards.ShardIndex:
    """Shards of 8x8 images whose pixels carry the sample's global index, written straight through the format."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp"
    tmp.mkdir()
    written, first = [], 0
    for number, count in enumerate(counts):
        def samples(first=first, count=count):
            for index in range(first, first + count):
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), index % 256, np.uint8)).save(buffer, format="PNG")
                yield {"__key__": f"{index:09d}", "image.png": buffer.getvalue(), shards.CONDITION: buffer.getvalue(),
                       shards.CAPTION: f"sample {index}".encode()}

        name = shards.shard_name(number)
        written.append(shards.Shard(name, shards.write_shard(folder / name, samples(), tmp), first))
        first += count
    shards.write_index(folder, written, tmp)
    return shards.read_index(folder, "--train_data_dir")


def break_image(tar: Path, index: int) -> None:
    """Rewrite a tiny_shards shard with sample `index`'s image bytes no image: unreadable, the rest intact."""
    with tarfile.open(tar) as opened:
        members = [(m, opened.extractfile(m).read()) for m in opened.getmembers()]
    with tarfile.open(tar, "w") as rewritten:
        for member, data in members:
            data = b"not a png" if member.name == f"{index:09d}.image.png" else data
            member.size = len(data)
            rewritten.addfile(member, io.BytesIO(data))


def tiny_parquet(folder: Path, counts: list[int], columns=("image", "conditioning_image", "text"), **flags):
    """A `datasets` dataset of one parquet file per count (datasets' Image features, as the Hub stores them), with
    the tiny_shards samples: 8x8 images whose pixels carry the row's global index; returns its streamed index."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    image, condition, caption = columns
    features = datasets.Features({image: datasets.Image(), condition: datasets.Image(),
                                  caption: datasets.Value("string")})
    first = 0
    for number, count in enumerate(counts):
        rows = range(first, first + count)
        pixels = [Image.fromarray(np.full((8, 8, 3), index % 256, np.uint8)) for index in rows]
        name = f"train-{number:05d}-of-{len(counts):05d}.parquet"
        datasets.Dataset.from_dict({image: pixels, condition: pixels, caption: [f"sample {i}" for i in rows]},
                                   features=features).to_parquet(folder / name)
        first += count
    return streamed(folder, **flags).index


def streamed(folder: Path, **flags):
    """load_examples of `--dataset_name folder --streaming`."""
    from tests.train.helpers import tiny_config
    from zeroconv.data.sources import load_examples

    return load_examples(tiny_config("unused", "unused", folder.parent / "run", train_data_dir=None,
                                     dataset_name=str(folder), streaming=True, **flags))


# the two kinds of shard a stream reads: webdataset tars, and the parquet files of a `datasets` dataset
SHARD_SETS = {"webdataset": tiny_shards, "parquet": tiny_parquet}


def stream_dataset(index, *, rank=0, world_size=1, num_workers=0, batch_size=2, shuffle_buffer=5, seed=3):
    from zeroconv.data.dataset import ControlNetDataset
    from zeroconv.data.transforms import PairedTransform

    samples = ControlNetDataset([], PairedTransform(8, 3), seed=seed, random_flip=True)
    return stream.StreamDataset(index, samples, seed=seed, batch_size=batch_size, rank=rank, world_size=world_size,
                                num_workers=num_workers, shuffle_buffer=shuffle_buffer)


def epoch_indices(dataset, epoch=0, start=0, workers=0) -> list[list[int]]:
    """The batches (their sample indices) of one epoch of `dataset`, from batch `start` on."""
    from zeroconv.data.dataset import collate
    from zeroconv.data.order import epoch_batches

    state = SimpleNamespace(epoch=epoch, batches_in_epoch=start)
    batches = epoch_batches(dataset, state, batch_size=dataset.batch_size, seed=dataset.seed, num_workers=workers,
                            collate_fn=collate)
    return [next(batches)["index"].tolist() for _ in range(dataset.batches_per_epoch() - start)]


def shard_log(monkeypatch, tmp_path) -> Path:
    """A file naming every shard the stream opens, in any process (loader workers fork from this one)."""
    log = tmp_path / "opened.txt"
    original = stream.read_shard

    def logged(index, shard):
        with open(log, "a") as fh:
            fh.write(Path(shard.name).name + "\n")
        return original(index, shard)

    monkeypatch.setattr(stream, "read_shard", logged)
    return log


def opened(log: Path) -> list[str]:
    return log.read_text().split() if log.is_file() else []


def test_prepare_writes_shards_holding_every_sample_with_an_index_written_last(tmp_path):
    out = prepare_shards(tmp_path, 10, 4)
    index = json.loads((out / shards.INDEX).read_text())
    assert [(s["name"], s["samples"], s["first_index"]) for s in index["shards"]] == [
        ("shard-000000.tar", 4, 0), ("shard-000001.tar", 4, 4), ("shard-000002.tar", 2, 8)]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    members = {}
    for entry in index["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    for i, row in enumerate(rows):  # sample i of the shard set is row i of the folder layout, bytes unchanged
        assert members[f"{i:09d}.image.png"] == (out / row["file_name"]).read_bytes()
        assert members[f"{i:09d}.conditioning_image.png"] == (out / row["conditioning_image_file_name"]).read_bytes()
        assert members[f"{i:09d}.txt"].decode() == row["text"] == f"photo {i}"
    assert len(members) == 3 * 10

    # the trainer sees 10 examples, without random access
    from tests.train.helpers import tiny_config
    from zeroconv.data.sources import ShardExamples, load_examples

    examples = load_examples(tiny_config("unused", out, tmp_path / "run"))
    assert isinstance(examples, ShardExamples) and len(examples) == 10

    # reshard on a rerun (--shard_size is not a dataset setting): stale shards go, the index follows
    prepare_shards(tmp_path, 10, 5)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert [s.samples for s in shards.read_index(out, "--train_data_dir").shards] == [5, 5]


def test_a_prepare_killed_while_writing_shards_leaves_no_index_and_the_trainer_says_so(tmp_path, monkeypatch):
    from tests.train.helpers import tiny_config
    from zeroconv.data.sources import load_examples

    original, calls = shards.write_shard, []

    def killed_inside_the_second(path, samples, tmp_dir):
        calls.append(path)

        def cut():  # the kill comes after the second shard's first sample went into its tar
            for k, sample in enumerate(samples):
                if len(calls) == 2 and k == 1:
                    raise KeyboardInterrupt
                yield sample

        return original(path, cut(), tmp_dir)

    monkeypatch.setattr(shards, "write_shard", killed_inside_the_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(tmp_path, 9, 3)
    out = tmp_path / "shards"
    assert len(calls) == 2 and any((out / ".prepare" / "tmp").iterdir())  # a half-written tar, under its tmp name
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar"] and not (out / shards.INDEX).exists()
    with pytest.raises(UserError, match=r"no shards\.json.*did not finish; run it again"):
        load_examples(tiny_config("unused", out, tmp_path / "run"))
    # killed inside the first shard: nothing in place but the marker, and the trainer still says so
    for shard in out.glob("shard-*.tar"):
        shard.unlink()
    with pytest.raises(UserError, match=r"no shards\.json.*did not finish"):
        load_examples(tiny_config("unused", out, tmp_path / "run"))
    monkeypatch.setattr(shards, "write_shard", original)
    prepare_shards(tmp_path, 9, 3)
    assert [s.samples for s in shards.read_index(out, "--train_data_dir").shards] == [3, 3, 3]
    assert not (out / shards.UNFINISHED).exists()


def test_an_index_naming_a_missing_or_truncated_shard_is_refused(tmp_path):
    tiny_shards(tmp_path / "set", [3, 3, 3])
    kept = (tmp_path / "set" / "shard-000001.tar").read_bytes()
    (tmp_path / "set" / "shard-000001.tar").unlink()
    with pytest.raises(UserError, match="shard-000001.tar, which is missing"):
        shards.read_index(tmp_path / "set", "--train_data_dir")
    (tmp_path / "set" / "shard-000001.tar").write_bytes(kept)
    meta = json.loads((tmp_path / "set" / shards.INDEX).read_text())
    meta["shards"][1]["samples"] = 5
    (tmp_path / "set" / shards.INDEX).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="starts at index 6, expected 8"):
        shards.read_index(tmp_path / "set", "--train_data_dir")
    # a shard with fewer samples than its index says: the stream names it instead of training short
    tiny_shards(tmp_path / "short", [4, 4])
    meta = json.loads((tmp_path / "short" / shards.INDEX).read_text())
    meta["shards"][0]["samples"], meta["shards"][1]["first_index"] = 6, 6
    (tmp_path / "short" / shards.INDEX).write_text(json.dumps(meta))
    dataset = stream_dataset(shards.read_index(tmp_path / "short", "--train_data_dir"), shuffle_buffer=0)
    with pytest.raises(UserError, match="shard-000000.tar holds 4 samples, its index says 6"):
        epoch_indices(dataset)


@pytest.mark.parametrize("kind", SHARD_SETS)
@pytest.mark.parametrize("shuffle_buffer", [0, 6])
def test_every_sample_once_per_epoch_across_2_ranks_and_2_workers_in_the_same_order_for_the_same_seed(
        tmp_path, shuffle_buffer, kind):
    index = SHARD_SETS[kind](tmp_path / "set", [4] * 8)  # 8 shards of 4: 2 per (rank, worker), 4 batches of 2 each
    seen = {}
    for epoch in range(2):
        for rank in range(2):
            dataset = stream_dataset(index, rank=rank, world_size=2, num_workers=2, shuffle_buffer=shuffle_buffer)
            assert dataset.batches_per_epoch() == 8
            seen[epoch, rank] = epoch_indices(dataset, epoch, workers=2)
        everything = [i for rank in range(2) for batch in seen[epoch, rank] for i in batch]
        assert sorted(everything) == list(range(32)), epoch
    assert seen[0, 0] != seen[1, 0]  # a new order each epoch
    again = stream_dataset(index, rank=1, world_size=2, num_workers=2, shuffle_buffer=shuffle_buffer)
    assert epoch_indices(again, 1, workers=2) == seen[1, 1]
    # each stream reads whole shards: rank 0's samples and rank 1's lie in disjoint shards
    shard_sets = [{i // 4 for batch in seen[0, rank] for i in batch} for rank in range(2)]
    assert not shard_sets[0] & shard_sets[1] and len(shard_sets[0]) == 4
    if shuffle_buffer:  # the buffer mixes across a stream's shards: some batch holds samples of two shards
        assert any(len({i // 4 for i in batch}) == 2 for rank in range(2) for batch in seen[0, rank])


def test_unequal_shards_give_every_rank_the_same_batch_count_every_epoch(tmp_path):
    index = tiny_shards(tmp_path / "set", [5, 5, 5, 2])  # 17 samples on 2 ranks: a stream holds 10 at most
    for epoch in range(3):
        counts, everything = [], []
        for rank in range(2):
            dataset = stream_dataset(index, rank=rank, world_size=2, batch_size=3)
            batches = epoch_indices(dataset, epoch)
            counts.append(len(batches))
            assert all(len(batch) == 3 for batch in batches)
            everything += [i for batch in batches for i in batch]
        assert counts == [4, 4]  # ceil(10 / 3): the same on both ranks whichever shard is short this epoch
        assert set(everything) == set(range(17))  # every sample, the shorter stream filling up with repeats
    # a resume inside the fill-up continues it exactly too
    full = epoch_indices(stream_dataset(index, rank=1, world_size=2, batch_size=3), 1)
    for start in range(1, 4):
        assert epoch_indices(stream_dataset(index, rank=1, world_size=2, batch_size=3), 1, start) == full[start:]


def test_the_shuffle_buffer_order_is_a_permutation_and_holds_at_most_the_buffer():
    rng = np.random.default_rng(0)
    order = stream.shuffle_order(50, 8, rng)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    # the k-th sample out was read at most buffer positions earlier than the k-th sample in: the memory bound
    assert all(order.index(p) >= p - 8 for p in range(50))
    assert stream.shuffle_order(5, 1, rng) == list(range(5))


@pytest.mark.parametrize("kind", SHARD_SETS)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_any_batch_continues_the_epoch_exactly_and_never_opens_a_consumed_shard(tmp_path, monkeypatch,
                                                                                         workers, kind):
    index = SHARD_SETS[kind](tmp_path / "set", [3] * 6)  # 18 samples, batch 3: 6 batches, a shuffle buffer of 4
    dataset = stream_dataset(index, num_workers=workers, batch_size=3, shuffle_buffer=4)
    full = epoch_indices(dataset, 2, workers=workers)
    assert sorted(i for batch in full for i in batch) == list(range(18))
    log = shard_log(monkeypatch, tmp_path)
    skipped_some = False
    for start in range(1, len(full)):
        log.unlink(missing_ok=True)
        resumed = epoch_indices(stream_dataset(index, num_workers=workers, batch_size=3, shuffle_buffer=4), 2, start,
                                workers=workers)
        assert resumed == full[start:], start  # the batches, in the order, of the uninterrupted epoch
        trained = {i for batch in full[:start] for i in batch}
        consumed = {Path(index.shards[n].name).name for n in range(6) if {3 * n, 3 * n + 1, 3 * n + 2} <= trained}
        assert not consumed & set(opened(log)), start
        assert len(opened(log)) == len(set(opened(log)))  # each remaining shard read once
        skipped_some |= bool(consumed)
    assert skipped_some  # some resume point had whole shards behind it


def test_an_unreadable_sample_is_replaced_and_counted_and_strict_data_stops(tmp_path):
    from zeroconv.data.dataset import collate
    from zeroconv.data.order import epoch_batches

    folder = tmp_path / "set"
    tiny_shards(folder, [4, 4])
    break_image(folder / "shard-000001.tar", 5)
    index = shards.read_index(folder, "--train_data_dir")
    dataset = stream_dataset(index, batch_size=4, shuffle_buffer=0)
    batches = epoch_batches(dataset, SimpleNamespace(epoch=0, batches_in_epoch=0), batch_size=4, seed=3,
                            num_workers=0, collate_fn=collate)
    taken = [next(batches) for _ in range(2)]
    indices = [i for batch in taken for i in batch["index"].tolist()]
    assert 5 not in indices and len(indices) == 8 and sum(batch["skipped"] for batch in taken) == 1
    dataset.samples.strict_data = True
    with pytest.raises(UserError, match="000000005|shard-000001.tar 5"):
        epoch_indices(dataset)


def test_too_few_shards_for_the_streams_is_refused_naming_the_fix(tmp_path):
    index = tiny_shards(tmp_path / "set", [4, 4, 4])
    with pytest.raises(UserError, match="3 shards for 2 processes x 2 loader workers.*--shard_size"):
        stream_dataset(index, world_size=2, num_workers=2)


def test_a_streamed_parquet_row_is_its_row_of_the_whole_dataset_through_the_column_flags(tmp_path):
    """--streaming reads the rows `load_dataset` gives (global index = row position across the ordered files),
    with the columns --image_column etc. name, the counts from the footers."""
    from zeroconv.data.dataset import collate
    from zeroconv.data.order import epoch_batches
    from zeroconv.data.sources import DatasetExamples, load_examples
    from tests.train.helpers import tiny_config

    flags = dict(image_column="target", conditioning_image_column="hint", caption_column="prompt")
    folder = tmp_path / "ds"
    index = tiny_parquet(folder, [3, 5, 2], columns=("target", "hint", "prompt"), **flags)
    assert [(Path(s.name).name, s.samples, s.first_index) for s in index.shards] == [
        ("train-00000-of-00003.parquet", 3, 0), ("train-00001-of-00003.parquet", 5, 3),
        ("train-00002-of-00003.parquet", 2, 8)]
    whole = load_examples(tiny_config("unused", "unused", tmp_path / "run", train_data_dir=None,
                                      dataset_name=str(folder), **flags))
    assert isinstance(whole, DatasetExamples) and [whole[i].caption for i in range(10)] == [
        f"sample {i}" for i in range(10)]
    dataset = stream_dataset(index, num_workers=0, batch_size=5, shuffle_buffer=4)
    batches = epoch_batches(dataset, SimpleNamespace(epoch=0, batches_in_epoch=0), batch_size=5, seed=3,
                            num_workers=0, collate_fn=collate)
    for _ in range(2):
        batch = next(batches)
        for k, i in enumerate(batch["index"].tolist()):
            assert batch["caption"][k] == f"sample {i}"  # the row's own caption...
            value = (batch["conditioning_pixel_values"][k] * 255).round().unique().tolist()
            assert value == [i], (i, value)  # ...and image: the draws of index i are row i's

    one = streamed(folder / "train-00001-of-00003.parquet", **flags).index  # a single parquet file
    assert [(s.samples, s.first_index) for s in one.shards] == [(5, 0)]

    with pytest.raises(UserError, match=r"--caption_column text: no such column.*columns are: target, hint, prompt"):
        streamed(folder, image_column="target", conditioning_image_column="hint")
    # a file without a column read is named
    import datasets

    datasets.Dataset.from_dict({"target": ["x"], "prompt": ["y"]}).to_parquet(folder / "train-00003-of-00003.parquet")
    with pytest.raises(UserError, match=r"train-00003-of-00003.parquet has no column hint"):
        streamed(folder, **flags)


def test_streaming_refuses_what_it_cannot_count_or_serve_naming_the_fix(tmp_path):
    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"image": "a.png", "conditioning_image": "b.png", "text": "t"}\n')
    with pytest.raises(UserError, match=r"json files; --streaming reads parquet only.*zeroconv prepare --format "
                                        r"webdataset.*or drop --streaming"):
        streamed(folder)
    tiny_parquet(tmp_path / "ds", [2, 2])
    for flags, refused in ((dict(max_train_samples=2), "--max_train_samples"),
                           (dict(aspect_buckets="default"), "--aspect_buckets")):
        with pytest.raises(UserError, match=f"{refused} with --dataset_name .* --streaming: a stream has no random"):
            streamed(tmp_path / "ds", **flags)
    # the latent cache serves a stream (tests/data/test_stream_cache.py), but not its --condition: on/only refused
    assert len(streamed(tmp_path / "ds", cache="on")) == 4
    for cache in ("on", "only"):
        with pytest.raises(UserError, match=f"--cache {cache} with --condition and --dataset_name .* --streaming: "
                                            r"--condition extracts .* use --cache auto .* or drop --condition"):
            streamed(tmp_path / "ds", cache=cache, condition="canny")
    from tests.train.helpers import tiny_config
    from zeroconv.data.sources import load_examples

    with pytest.raises(UserError, match="--streaming streams a --dataset_name"):
        load_examples(tiny_config("unused", tmp_path / "ds", tmp_path / "run", streaming=True))
    # too few files for the streams: the fix names files, not --shard_size only
    with pytest.raises(UserError, match=r"--streaming: 2 parquet files for 2 processes x 2 loader workers.*smaller "
                                        r"parquet files"):
        stream_dataset(streamed(tmp_path / "ds").index, world_size=2, num_workers=2)


def test_data_files_behind_a_url_are_counted_and_streamed_through_fsspec(tmp_path):
    """Hub files are `hf://` URLs read through fsspec (HfFileSystem); fsspec's memory filesystem stands in for
    it offline: footers counted in parallel, rows read by URL, the stream whole."""
    import fsspec

    from zeroconv.data import datafiles

    local = tiny_parquet(tmp_path / "ds", [4] * 4)
    memory = fsspec.filesystem("memory")
    urls = []
    for shard in local.shards:
        url = f"memory://zeroconv-test/{Path(shard.name).name}"
        memory.pipe(url, Path(shard.name).read_bytes())
        urls.append(url)
    try:
        counts = datafiles.read_footers(urls, "--dataset_name test")
        index = datafiles.data_file_index("owner/name", None, urls, counts, local.columns, "--dataset_name test")
        assert [(s.samples, s.first_index) for s in index.shards] == [(4, 0), (4, 4), (4, 8), (4, 12)]
        assert index.fingerprint() != local.fingerprint()
        everything = [i for batch in epoch_indices(stream_dataset(index, num_workers=2), workers=2) for i in batch]
        assert sorted(everything) == list(range(16))
    finally:
        memory.rm("memory://zeroconv-test", recursive=True)
