"""Ray storage on an S3-compatible server (moto's standalone server on loopback): a stage trains
with its checkpoints in a bucket, a second run resumes from them, and the storage check passes
for the bucket and names an unreachable one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from .cluster_harness import free_port
from .ray_fixtures import release_shared_ray, tiny_cfg, tiny_root  # noqa: F401 - fixtures

pytest.importorskip("moto", reason="moto (the test extra) runs the local S3 server")
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    port = free_port()
    # the server of the environment running the tests (another install on PATH may not speak the
    # S3 dialect of this environment's pyarrow)
    beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
    exe = beside if os.path.exists(beside) else shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in KEYS}
    os.environ.update(KEYS)  # the driver's; Ray workers get them through the job's runtime env below
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        for _ in range(300):
            try:
                fs.create_dir("tocoad")
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("moto's S3 server did not start")
        yield {"port": port, "fs": fs, "uri": f"s3://tocoad/ray?endpoint_override=127.0.0.1:{port}&scheme=http"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_stage_checkpoints_in_a_bucket_and_resume_from_it(s3_server, tiny_root):  # noqa: F811
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from tocoad_ray.distributed.storage import StorageError, check_cluster, join

    release_shared_ray()  # the workers need the bucket's keys in their environment
    if ray.is_initialized():  # an instance a CLI test started in this process
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": KEYS})
    try:
        from .test_distributed_train import _stage1_inputs
        from tocoad_ray.distributed.stages import run_stage

        uri = s3_server["uri"]
        check_cluster({"distributed.storage_path": uri})
        cfg = tiny_cfg(**{"distributed.num_workers": 1, "stage1.epochs": 2})
        store, n, spec = _stage1_inputs(cfg, tiny_root)
        first = run_stage(cfg, 1, "bottle", store, n, spec, uri)
        assert [h["epoch"] for h in first.history] == [1, 2]
        import pyarrow.fs as pafs

        names = [i.path for i in s3_server["fs"].get_file_info(pafs.FileSelector("tocoad/ray", recursive=True))]
        assert any("/checkpoint_" in p for p in names), names  # the checkpoints are in the bucket
        # a longer schedule with the same name resumes the bucket's checkpoint (epoch 2) instead of restarting
        more = tiny_cfg(**{"distributed.num_workers": 1, "stage1.epochs": 3})
        again = run_stage(more, 1, "bottle", store, n, spec, uri)
        assert [h["epoch"] for h in again.history] == [1, 2, 3] and max(again.attempts_resumed) == 2
        assert again.history[:2] == first.history
        # a bucket nobody can reach is named, within seconds
        t = time.monotonic()
        with pytest.raises(StorageError, match="distributed.storage_path s3://missing-bucket"):
            check_cluster({"distributed.storage_path": join(uri.replace("tocoad", "missing-bucket"), "x")})
        assert time.monotonic() - t < 30
    finally:
        ray.shutdown()
