"""A webdataset shard folder behind a URL (`--train_data_dir s3://...`, `hf://...`) streams through fsspec as
its local copy does (issue 16: datasets larger than a disk). fsspec's memory filesystem stands in for object
storage and the Hub offline: the prepared folder's shards.json and tars are copied into it as an upload would."""

import importlib.util
import uuid
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from tests.data.test_stream import epoch_indices, prepare_shards, stream_dataset, tiny_shards
from tests.train.helpers import controlnet_weights, fresh_setup, losses, tiny_config, train_recording_batches
from zeroconv.data import shards
from zeroconv.errors import UserError


@pytest.fixture
def memory_url():
    """A fresh memory:// folder URL, removed afterwards (the memory filesystem is one store per process)."""
    url = f"memory://zeroconv-test-{uuid.uuid4().hex[:8]}/shards"
    yield url
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://").split("/")[0]
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def upload(folder: Path, url: str) -> None:
    """What a user uploads: shards.json and the tars the prepared folder holds, names unchanged."""
    fs = fsspec.filesystem("memory")
    for path in sorted(folder.glob("shard-*.tar")) + [folder / shards.INDEX]:
        fs.pipe(f"{url}/{path.name}", path.read_bytes())


def samples_of(index) -> list[list[dict]]:
    """Every shard's samples, in order, without webdataset's bookkeeping keys (__url__ names where they came from)."""
    return [[{k: v for k, v in sample.items() if k != "__url__"} for sample in index.read(shard)]
            for shard in index.shards]


def test_a_shard_folder_at_a_url_is_found_and_reads_the_samples_of_its_local_copy(tmp_path, memory_url,
                                                                                 monkeypatch):
    local = tiny_shards(tmp_path / "set", [4, 4, 3])
    upload(tmp_path / "set", memory_url)
    assert shards.is_shard_folder(memory_url) and not shards.is_shard_folder(memory_url + "-elsewhere")

    # one listing of the folder checks and stamps every shard: no request per shard
    calls = []

    def counted(name):
        original = getattr(MemoryFileSystem, name)

        def call(self, path, *args, **kwargs):
            calls.append((name, path))
            return original(self, path, *args, **kwargs)
        return call

    for name in ("ls", "info"):
        monkeypatch.setattr(MemoryFileSystem, name, counted(name))
    remote = shards.read_index(memory_url + "/", "--train_data_dir")  # a trailing slash names the same folder
    assert [path for name, path in calls if name == "ls"] == ["/" + memory_url.removeprefix("memory://")]
    assert not [path for name, path in calls if name == "info"]
    monkeypatch.undo()

    assert remote.folder == memory_url and remote.where == f"--train_data_dir {memory_url}"
    assert remote.shards == local.shards
    assert samples_of(remote) == samples_of(local)  # the same keys, members and bytes, in the same order

    from zeroconv.data.sources import ShardExamples, load_examples

    examples = load_examples(tiny_config("unused", memory_url, tmp_path / "run"))
    assert isinstance(examples, ShardExamples) and len(examples) == 11 and memory_url in examples.description
    # a stream over it: every sample once an epoch, two loader workers (forked, reading by URL)
    everything = [i for batch in epoch_indices(stream_dataset(examples.index, num_workers=2), workers=2)
                  for i in batch]
    assert sorted(set(everything)) == list(range(11))


def test_a_streamed_run_from_a_url_takes_the_batches_and_weights_of_the_local_folder(tiny_base, tmp_path,
                                                                                    memory_url):
    data = prepare_shards(tmp_path, 16, 4)  # 4 shards of 4
    upload(data, memory_url)
    # live (tiny_config's --cache off), so the batches' pixels can be compared
    common = dict(train_batch_size=4, dataloader_num_workers=2, shuffle_buffer=3, random_flip=True,
                  max_train_steps=4, checkpointing_steps=4)
    runs = {name: train_recording_batches(fresh_setup(tiny_config(tiny_base, source, tmp_path / name, **common)))
            for name, source in (("local", str(data)), ("remote", memory_url))}
    local, remote = runs["local"], runs["remote"]
    assert [b["index"].tolist() for b in remote] == [b["index"].tolist() for b in local]
    assert sorted(i for b in local for i in b["index"].tolist()) == list(range(16))
    for a, b in zip(local, remote):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])
    assert losses(tmp_path / "remote") == losses(tmp_path / "local")
    a, b = (controlnet_weights(tmp_path / name / "checkpoint-4") for name in ("local", "remote"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --cache auto on the URL: the latent cache, built from the shards at the URL, serves the live batches
    cached = train_recording_batches(fresh_setup(tiny_config(tiny_base, memory_url, tmp_path / "cached", cache="auto",
                                                             latent_cache_dir=str(tmp_path / "cache"), **common)))
    assert "latent_mean" in cached[0] and [b["index"].tolist() for b in cached] == [b["index"].tolist() for b in local]
    live, served = losses(tmp_path / "remote"), losses(tmp_path / "cached")
    assert live.keys() == served.keys() and all(abs(live[s] - served[s]) <= 1e-5 * abs(live[s]) for s in live)


def test_a_missing_shard_or_index_at_a_url_is_a_user_error_naming_the_flag_url_and_fix(tmp_path, memory_url):
    from zeroconv.data.sources import load_examples

    tiny_shards(tmp_path / "set", [3, 3, 3])
    upload(tmp_path / "set", memory_url)
    memory = fsspec.filesystem("memory")
    opened = shards.read_index(memory_url, "--train_data_dir")

    kept = memory.cat_file(f"{memory_url}/shard-000001.tar")
    memory.rm(f"{memory_url}/shard-000001.tar")
    with pytest.raises(UserError, match=rf"--train_data_dir {memory_url}: shards.json lists shard-000001.tar, "
                                        r"which is missing; upload every shard the index lists"):
        load_examples(tiny_config("unused", memory_url, tmp_path / "run"))
    # gone after the run read the index: the stream names it instead of training short
    with pytest.raises(UserError, match=rf"--train_data_dir {memory_url}: {memory_url}/shard-000001.tar is gone"):
        list(opened.read(opened.shards[1]))
    memory.pipe(f"{memory_url}/shard-000001.tar", kept)

    memory.rm(f"{memory_url}/{shards.INDEX}")  # shards without their index: an upload cut short
    with pytest.raises(UserError, match=rf"--train_data_dir {memory_url}: shards but no shards.json.*upload is "
                                        r"incomplete.*upload shards.json after the shards"):
        load_examples(tiny_config("unused", memory_url, tmp_path / "run"))
    assert not shards.is_shard_folder(memory_url)

    # a URL of anything else is refused: only shard folders stream from a URL
    other = memory_url + "-images"
    memory.pipe(f"{other}/metadata.jsonl", b'{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match=rf"--train_data_dir {other}: no shards.json, so not a webdataset shard "
                                        r"folder.*--dataset_name X --streaming"):
        load_examples(tiny_config("unused", other, tmp_path / "run"))
    memory.pipe(f"{other}/{shards.INDEX}", b"{not json")
    with pytest.raises(UserError, match=rf"--train_data_dir {other}: shards.json is unreadable \(JSONDecodeError"):
        load_examples(tiny_config("unused", other, tmp_path / "run"))


def test_the_fingerprint_of_a_url_is_stable_across_reads_and_changes_with_a_shard(tmp_path, memory_url):
    from zeroconv.train.setup import check_stream_resume

    tiny_shards(tmp_path / "set", [4, 4])
    upload(tmp_path / "set", memory_url)
    first, again = (shards.read_index(memory_url, "--train_data_dir") for _ in range(2))
    assert first.fingerprint() == again.fingerprint() and first.identity() == again.identity() == {}
    assert first.fingerprint() != tiny_shards(tmp_path / "copy", [4, 4]).fingerprint()  # a local copy: other stamps

    # a checkpoint taken in mid-epoch on `first` resumes on a second read of the same folder...
    layout = stream_dataset(first, batch_size=2).layout()
    state = SimpleNamespace(epoch=0, batches_in_epoch=2, stream=layout)
    check_stream_resume(state, stream_dataset(again, batch_size=2), Path("checkpoint-2"))

    # ...and not once a shard was replaced, even by the same bytes (its version moved: another upload)
    memory = fsspec.filesystem("memory")
    memory.pipe(f"{memory_url}/shard-000001.tar", memory.cat_file(f"{memory_url}/shard-000001.tar"))
    replaced = shards.read_index(memory_url, "--train_data_dir")
    assert replaced.shards == first.shards and replaced.fingerprint() != first.fingerprint()
    with pytest.raises(UserError, match=r"another stream layout \(shards: checkpoint"):
        check_stream_resume(SimpleNamespace(epoch=0, batches_in_epoch=2, stream=layout),
                            stream_dataset(replaced, batch_size=2), Path("checkpoint-2"))
    # a shard of another size
    memory.pipe(f"{memory_url}/shard-000000.tar", memory.cat_file(f"{memory_url}/shard-000000.tar") + b"\0" * 512)
    assert shards.read_index(memory_url, "--train_data_dir").fingerprint() != replaced.fingerprint()


@pytest.mark.parametrize("url, package", [("s3://bucket/shards", "s3fs"), ("gs://bucket/shards", "gcsfs")])
def test_a_url_whose_fsspec_backend_is_missing_names_the_package_to_install(tmp_path, url, package):
    from zeroconv.data.sources import load_examples

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    scheme = url.split("://")[0]
    with pytest.raises(UserError, match=rf"--train_data_dir {url}: fsspec has no {scheme}:// backend installed; "
                                        rf"pip install {package}"):
        load_examples(tiny_config("unused", url, tmp_path / "run"))
    assert not shards.is_shard_folder(url)


def test_an_hf_url_is_read_through_huggingface_hubs_filesystem(tmp_path, monkeypatch):
    """hf:// goes to HfFileSystem (no request made here: its reads are replaced by a stand-in)."""
    from huggingface_hub import HfFileSystem

    from zeroconv.data.sources import load_examples

    url = "hf://datasets/org/repo/shards"
    fs, path = shards.remote_fs(url, "--train_data_dir")
    assert isinstance(fs, HfFileSystem) and path == "datasets/org/repo/shards"
    asked = []

    def not_there(self, path, *args, **kwargs):
        asked.append(path)
        raise FileNotFoundError(path)

    monkeypatch.setattr(HfFileSystem, "cat_file", not_there)
    monkeypatch.setattr(HfFileSystem, "ls", lambda self, path, *a, **k: [])
    with pytest.raises(UserError, match=rf"--train_data_dir {url}: no shards.json, so not a webdataset shard folder"):
        load_examples(tiny_config("unused", url, tmp_path / "run"))
    assert asked == ["datasets/org/repo/shards/shards.json"]


def test_a_listing_without_sizes_looks_each_shard_up_so_the_fingerprint_still_sees_a_change(tmp_path, memory_url,
                                                                                           monkeypatch):
    """A plain https server's index page lists names only (fsspec's HTTPFileSystem gives no size): each shard
    is then stamped from its own lookup (a HEAD request there), not from a listing that cannot tell a change."""
    tiny_shards(tmp_path / "set", [4, 4])
    upload(tmp_path / "set", memory_url)
    listed, looked_up_in, looked_up = MemoryFileSystem.ls, MemoryFileSystem.info, []

    def names_only(self, path, detail=True, **kwargs):  # what HTTPFileSystem lists: a name and a type
        return [{"name": e["name"], "size": None, "type": e["type"]} for e in listed(self, path, detail=True, **kwargs)]

    def info(self, path, **kwargs):
        looked_up.append(path.rsplit("/", 1)[-1])
        return looked_up_in(self, path, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "ls", names_only)
    monkeypatch.setattr(MemoryFileSystem, "info", info)
    before = shards.read_index(memory_url, "--train_data_dir")
    assert sorted(set(looked_up)) == ["shard-000000.tar", "shard-000001.tar"]
    memory = fsspec.filesystem("memory")
    memory.pipe(f"{memory_url}/shard-000001.tar", memory.cat_file(f"{memory_url}/shard-000001.tar") + b"\0" * 512)
    assert shards.read_index(memory_url, "--train_data_dir").fingerprint() != before.fingerprint()
