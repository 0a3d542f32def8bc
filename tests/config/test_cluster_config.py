"""[cluster] and [results]: defaults to this machine, errors that name the key."""
import pytest

from genserve.config.load import ConfigError, parse_config

MODEL = {"models": {"m": {"kind": "image", "source": "demo:image"}}}


def test_defaults_are_local():
    c = parse_config(MODEL)
    assert c.cluster.provider == "local" and c.results.store == "local"


def test_ray_and_s3():
    c = parse_config({**MODEL, "cluster": {"provider": "ray", "address": "h:6379", "device_resource": "gd",
                                           "workers": 3},
                      "results": {"store": "s3", "bucket": "b", "prefix": "o/", "endpoint_url": "http://127.0.0.1:9",
                                  "serve": "proxy"}})
    assert (c.cluster.provider, c.cluster.address, c.cluster.workers) == ("ray", "h:6379", 3)
    spec = c.results.spec(c.server.data_dir)
    assert spec["store"] == "s3" and spec["bucket"] == "b" and spec["serve"] == "proxy"


@pytest.mark.parametrize("address", ["auto", "h:6379", "10.0.0.5:6379", "ray://h:10001", "ray://127.0.0.1:10001",
                                     "ray://[::1]:10001"])
def test_ray_address_forms(address):
    assert parse_config({**MODEL, "cluster": {"provider": "ray", "address": address}}).cluster.address == address


@pytest.mark.parametrize("section, raw, key", [
    ("cluster", {"provider": "k8s"}, "cluster.provider"),
    ("cluster", {"workers": -1}, "cluster.workers"),
    ("cluster", {"adress": "auto"}, "cluster.adress"),
    ("cluster", {"provider": "ray", "address": "http://head:10001"}, "cluster.address"),
    ("cluster", {"provider": "ray", "address": "ray://head"}, "cluster.address"),  # no port
    ("cluster", {"provider": "ray", "address": "ray://:10001"}, "cluster.address"),  # no host
    ("cluster", {"provider": "ray", "address": "head:0"}, "cluster.address"),
    ("cluster", {"provider": "ray", "address": "head:6379/x"}, "cluster.address"),
    ("results", {"store": "s3"}, "results.bucket"),
    ("results", {"store": "gcs"}, "results.store"),
    ("results", {"serve": "inline"}, "results.serve"),
    ("results", {"store": "s3", "bucket": "b", "aws_secret_access_key": "x"}, "results.aws_secret_access_key"),
])
def test_errors_name_the_key(section, raw, key):
    with pytest.raises(ConfigError) as e:
        parse_config({**MODEL, section: raw})
    assert e.value.key == key
