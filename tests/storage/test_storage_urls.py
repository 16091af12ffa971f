"""The URL helper: protocols, joins, S3 endpoint from the environment, masked secrets, Zarr stores."""

from __future__ import annotations

import pytest
import zarr

from storage.urls import exists, is_local, join, mask_options, protocol_of, put_atomic, url_to_fs, zarr_store


def test_protocols_and_join():
    assert protocol_of("/data/x") == "file" and protocol_of("file:///data") == "file"
    assert protocol_of("s3://b/p") == "s3" and protocol_of("memory://m") == "memory"
    assert is_local("rel/path") and not is_local("s3://b")
    assert join("s3://b/", "/latents/", "id") == "s3://b/latents/id"
    assert join("/tmp/x", "a", "", "b/") == "/tmp/x/a/b"
    with pytest.raises(ValueError, match="protocol 'nope'"):
        url_to_fs("nope://x")
    with pytest.raises(ValueError, match="empty"):
        url_to_fs("")


def test_mask_options_hides_secrets_recursively():
    opts = {"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://h", "client_kwargs": {"aws_session_token": "t",
                                                                                             "region_name": "r"}}
    masked = mask_options(opts)
    assert masked == {"key": "***", "secret": "***", "endpoint_url": "http://h",
                      "client_kwargs": {"aws_session_token": "***", "region_name": "r"}}
    assert "s3cr3t" not in repr(masked) and opts["secret"] == "s3cr3t"


def test_local_paths_and_atomic_put(tmp_path):
    fs, path = url_to_fs(f"file://{tmp_path}/a")
    put_atomic(fs, f"{path}/m.json", b"{}")
    assert exists(str(tmp_path / "a" / "m.json")) and (tmp_path / "a" / "m.json").read_bytes() == b"{}"
    assert not list((tmp_path / "a").glob("*.partial"))
    assert type(zarr_store(str(tmp_path / "z"))).__name__ == "LocalStore"


def test_memory_store_is_shared_with_fsspec():
    group = zarr.open_group(zarr_store("memory://urls-test/g"), mode="w")
    group.attrs["x"] = 1
    assert exists("memory://urls-test/g/zarr.json")


def test_s3_endpoint_comes_from_env(s3_server):
    url = s3_server.make_bucket() + "/p"
    fs, path = url_to_fs(url)
    fs.pipe_file(f"{path}/obj", b"data")
    assert exists(f"{url}/obj") and fs.cat_file(f"{path}/obj") == b"data"
    group = zarr.open_group(zarr_store(f"{url}/z"), mode="w")
    group.create_array("a", shape=(4,), dtype="int16")[:] = [1, 2, 3, 4]
    assert list(zarr.open_group(zarr_store(f"{url}/z", read_only=True), mode="r")["a"][:]) == [1, 2, 3, 4]


def test_network_guard_blocks_non_loopback():
    import socket

    with socket.socket() as s, pytest.raises(ConnectionRefusedError, match="blocked"):
        s.connect(("93.184.216.34", 80))


def test_local_scheme_means_a_local_path_everywhere(tmp_path, monkeypatch):
    """``local://x``, ``file://x`` and ``x`` are one local path for every URL test (storage, flows' root and result
    storage, figure links); ``s3://`` / ``memory://`` are remote."""
    from flows.env import local_root, prefect_home_for
    from storage.urls import local_path, scheme_prefix

    monkeypatch.chdir(tmp_path)
    spellings = ["rel/root", "local://rel/root", "file://rel/root", str(tmp_path / "rel" / "root")]
    want = str(tmp_path / "rel" / "root")
    for url in spellings:
        assert is_local(url) and local_path(url) == want and scheme_prefix(url) == ""
        assert url_to_fs(url)[1] == want and local_root(url) == want
        assert prefect_home_for(url) == tmp_path / "rel" / "root" / ".prefect"
    for url in ("s3://b/p", "memory://m/p"):
        assert not is_local(url) and scheme_prefix(url) == url.split("//")[0] + "//" and local_root(url) == url
        with pytest.raises(ValueError, match="not a local path"):
            local_path(url)


def test_write_atomic_and_glob_keep_the_scheme(tmp_path):
    from storage.urls import glob, read_bytes, write_atomic

    for base in (f"local://{tmp_path}/w", "memory://urls-test/w"):
        write_atomic(join(base, "a", "x.json"), b"1")
        write_atomic(join(base, "b", "x.json"), b"2")
        found = glob(join(base, "*", "x.json"))
        assert [read_bytes(u) for u in found] == [b"1", b"2"]
        assert all(u.startswith("memory://") for u in found) or all(not u.startswith("memory") for u in found)
    assert not list((tmp_path / "w").rglob("*.partial"))
