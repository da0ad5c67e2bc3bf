"""download() against a throwaway HTTP server on 127.0.0.1: verified files land, bad ones never do."""

import functools
import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest

from fundl.data import DownloadError, catalog, download, load_idx_dataset
from fundl.data.idx import encode_idx


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("FUNDL_DATA_DIR", raising=False)
    monkeypatch.setenv("FUNDL_CACHE_DIR", str(tmp_path / "default-cache"))


class _Server:
    """Serves ``root`` at http://127.0.0.1:<port>/ and records the paths requested."""

    def __init__(self, root):
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A fake 'tiny' dataset in the catalog, its good files under /good and a corrupted copy under /bad."""
    rng = np.random.default_rng(0)
    good, bad = tmp_path / "www" / "good", tmp_path / "www" / "bad"
    good.mkdir(parents=True)
    bad.mkdir(parents=True)
    splits = {}
    for split, prefix, n in (("train", "train", 30), ("test", "t10k", 10)):
        files = []
        for kind, arr in (("images-idx3-ubyte", rng.integers(0, 256, (n, 5, 5), dtype=np.uint8)),
                          ("labels-idx1-ubyte", rng.integers(0, 10, n).astype(np.uint8))):
            name, raw = f"{prefix}-{kind}", encode_idx(arr)
            (good / f"{name}.gz").write_bytes(gzip.compress(raw))
            flipped = bytearray(raw)
            flipped[-1] ^= 0xFF  # one byte of payload differs; the file is still valid IDX
            (bad / f"{name}.gz").write_bytes(gzip.compress(bytes(flipped)))
            files.append(catalog.IdxFile(name, hashlib.md5(raw).hexdigest(), arr.shape))
        splits[split] = tuple(files)
    spec = catalog.IdxDataset("tiny", splits, 10, ("tiny",), (), mirrors=("http://127.0.0.1:9/never-used",))
    monkeypatch.setitem(catalog.IDX_DATASETS, "tiny", spec)
    server = _Server(tmp_path / "www")
    yield server
    server.close()


def test_good_payload_is_verified_and_loadable(site, tmp_path, capsys):
    cache = tmp_path / "cache"
    target = download("tiny", cache_dir=cache, mirrors=[site.url + "/good"], progress=True)
    assert target == cache / "tiny"
    assert sorted(p.name for p in target.iterdir()) == sorted(f.filename + ".gz" for f in catalog.get("tiny").files)
    assert "127.0.0.1" in capsys.readouterr().err  # progress went to stderr
    data = load_idx_dataset("tiny", cache_dir=cache)  # found in the cache, md5-verified again on load
    assert data["train"][0].shape == (30, 5, 5)
    # a second call finds verified files and fetches nothing
    n = len(site.requests)
    download("tiny", cache_dir=cache, mirrors=[site.url + "/good"], progress=False)
    assert len(site.requests) == n


def test_corrupted_payload_rejected_and_nothing_left(site, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as e:
        download("tiny", cache_dir=cache, mirrors=[site.url + "/bad", site.url + "/missing"], progress=False)
    msg = str(e.value)
    assert "expected md5" in msg and "/bad/train-images-idx3-ubyte.gz" in msg
    assert "/missing/train-images-idx3-ubyte.gz: HTTPError" in msg
    assert not cache.exists(), sorted(cache.rglob("*"))  # no file, no temp file, no empty folder


def test_corrupted_payload_in_existing_cache_leaves_it_as_it_was(site, tmp_path):
    cache = tmp_path / "cache"
    (cache / "tiny").mkdir(parents=True)
    (cache / "keep.txt").write_text("x")
    with pytest.raises(DownloadError):
        download("tiny", cache_dir=cache, mirrors=[site.url + "/bad"], progress=False)
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*")) == ["keep.txt", "tiny"]


def test_falls_back_to_next_mirror(site, tmp_path):
    target = download("tiny", cache_dir=tmp_path / "c", mirrors=[site.url + "/bad", site.url + "/good"], progress=False)
    assert len(list(target.iterdir())) == 4
    assert any(r.startswith("/bad/") for r in site.requests) and any(r.startswith("/good/") for r in site.requests)


def test_replaces_a_corrupted_cached_file(site, tmp_path):
    target = tmp_path / "c" / "tiny"
    target.mkdir(parents=True)
    (target / "train-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    download("tiny", cache_dir=tmp_path / "c", mirrors=[site.url + "/good"], progress=False)
    assert load_idx_dataset("tiny", cache_dir=tmp_path / "c")["train"][1].shape == (30,)


def test_default_cache_dir_from_env(site, tmp_path):
    assert download("tiny", mirrors=[site.url + "/good"], progress=False) == tmp_path / "default-cache" / "tiny"


def test_unknown_name_and_no_mirrors():
    with pytest.raises(KeyError, match="known"):
        download("imagenet", mirrors=["http://127.0.0.1:9"])
    with pytest.raises(ValueError, match="at least one mirror"):
        download("mnist", mirrors=[])
