"""The service configuration reaches the Serve deployments (no Ray instance: the bound application
is inspected as ``serve.run`` would receive it)."""
from __future__ import annotations

from pathlib import Path

import pytest

from serve.app import build_app
from serve.config import Autoscaling, ConfigError, from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def _deployments(app) -> dict:
    ingress = app._bound_deployment
    out = {ingress.name: ingress}
    for arg in ingress.init_args:
        bound = getattr(arg, "_bound_deployment", None)
        if bound is not None:
            out[bound.name] = bound
    return out


def test_autoscaling_settings_reach_the_deployments():
    deps = _deployments(build_app({"backbone": {"autoscaling": {"upscale_delay_s": 2, "downscale_delay_s": 45}}}))
    bb = deps["Backbone"]._deployment_config.autoscaling_config
    assert (bb.upscale_delay_s, bb.downscale_delay_s) == (2, 45)
    assert bb.look_back_period_s == Autoscaling().look_back_period_s
    # the defaults follow scoring traffic, not Ray's 30 s up / 10 min down
    sh = deps["BankShard"]._deployment_config.autoscaling_config
    assert sh.upscale_delay_s <= 10 and sh.downscale_delay_s <= 60
    # fractional CPUs: a second backbone replica fits beside the first on a small node
    assert deps["Backbone"].ray_actor_options["num_cpus"] < 1


def test_shipped_config_file_loads_with_its_autoscaling():
    cfg = load_config(ROOT / "serve" / "config.yaml")
    assert cfg.backbone.autoscaling.downscale_delay_s == 60 and cfg.shards.autoscaling.upscale_delay_s == 2


@pytest.mark.parametrize("bad, match", [
    ({"backbone": {"autoscaling": {"upscale_delay_s": -1}}}, "backbone.autoscaling"),
    ({"shards": {"autoscaling": {"look_back_period_s": 0}}}, "shards.autoscaling"),
    ({"shards": {"autoscaling": {"cooldown": 3}}}, "unknown keys"),
    ({"backbone": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
])
def test_bad_autoscaling_is_named(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(bad)
