"""Storage paths: URIs are never turned into local paths, relative paths are resolved on the driver,
and the storage check reads and writes through pyarrow for both kinds."""
from __future__ import annotations

import pytest

from tocoad_ray.config import ConfigError, load_config
from tocoad_ray.distributed.storage import (describe, filesystem, is_uri, join, read_text, resolve,
                                            write_text, NodeAnswer)


def test_uris_stay_uris():
    for uri in ("s3://bucket/ray", "gs://bucket/a/b", "file:///mnt/shared/ray"):
        assert is_uri(uri) and resolve(uri) == uri
    assert join("s3://bucket/ray", "runs", "abc") == "s3://bucket/ray/runs/abc"
    assert join("s3://bucket/ray/", "x") == "s3://bucket/ray/x"
    # a query (e.g. a local S3 server's endpoint) stays at the end
    assert join("s3://b/ray?endpoint_override=127.0.0.1:9000&scheme=http", "runs") == \
        "s3://b/ray/runs?endpoint_override=127.0.0.1:9000&scheme=http"


def test_relative_paths_resolve_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("out/ray") == str(tmp_path / "out" / "ray")
    assert join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")


def test_text_round_trip_through_a_file_uri_and_a_path(tmp_path):
    for base in (f"file://{tmp_path}/uri", str(tmp_path / "plain")):
        p = join(base, "deep", "marker")
        assert read_text(p) is None
        write_text(p, "hello")
        assert read_text(p) == "hello"
    assert (tmp_path / "uri" / "deep" / "marker").read_text() == "hello"
    fs, p = filesystem(f"file://{tmp_path}/uri")
    assert p == f"{tmp_path}/uri"


def test_failure_message_groups_nodes_per_path():
    msg = describe([NodeAnswer("aaa (10.0.0.1)", [("output folder (--out)", "/x", "does not exist there")]),
                    NodeAnswer("bbb (10.0.0.2)", [("output folder (--out)", "/x", "does not exist there")])], 3)
    assert "2 of 3 nodes" in msg
    assert "output folder (--out) /x does not exist there; on nodes aaa (10.0.0.1), bbb (10.0.0.2)" in msg


def test_output_folder_uri_is_refused_before_ray_starts(tmp_path):
    from jobs.train_all import run

    with pytest.raises(ConfigError, match="--out s3://bucket/out"):
        run(load_config(None, {"method": "patchcore"}), str(tmp_path), ["x"], "s3://bucket/out")


def test_placement_settings_are_typed():
    cfg = load_config(None, {"distributed.placement_strategy": "SPREAD", "distributed.worker_resources": {"gpu_box": 1}})
    assert cfg.distributed.worker_resources == {"gpu_box": 1.0}
    with pytest.raises(ConfigError, match="placement_strategy"):
        load_config(None, {"distributed.placement_strategy": "EVERYWHERE"})
    with pytest.raises(ConfigError, match="custom resources"):
        load_config(None, {"distributed.driver_resources": {"CPU": 2}})
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(None, {"distributed.driver_resources": 3})


def test_input_paths_in_the_config_resolve_on_the_driver(tmp_path, monkeypatch):
    from jobs.train_all import resolve_inputs

    monkeypatch.chdir(tmp_path)
    cfg = resolve_inputs(load_config(None, {"generator.texture_dir": "textures", "backbone.weights": "f.safetensors",
                                            "distributed.storage_path": "ckpt"}))
    assert cfg.generator.texture_dir == str(tmp_path / "textures")
    assert cfg.backbone.weights == str(tmp_path / "f.safetensors")
    assert cfg.distributed.storage_path == str(tmp_path / "ckpt")
    kept = resolve_inputs(load_config(None, {"distributed.storage_path": "gs://bucket/ray"}))
    assert kept.distributed.storage_path == "gs://bucket/ray" and kept.backbone.weights == "pretrained"
