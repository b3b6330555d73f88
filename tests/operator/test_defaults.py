"""Operator-level defaults: resolution of unset spec fields, validation messages, flags, and the spec hash."""

from __future__ import annotations

from typing import Any

import pytest

from pypto_serving.operator import cli
from pypto_serving.operator import desired as d
from pypto_serving.operator.defaults import BUILTIN, OperatorDefaults, defaulted_fields, resolve
from pypto_serving.operator.types import PyptoServingSpec
from pypto_serving.operator.validation import check_defaults, summary, validate
from tests.operator.corpus import minimal

SITE = OperatorDefaults(engine_image="registry.local/pypto-serving:0.1.0-cann",
                        gateway_image="registry.local/pypto-serving-gateway:0.1.0",
                        device_resource_name="huawei.com/ascend-1980", devices_per_node=8, routing="prefix-aware",
                        gateway_service_type="NodePort")


def raw(**overrides: Any) -> PyptoServingSpec:
    return PyptoServingSpec.model_validate(minimal(**overrides)["spec"])


def test_resolve_fills_only_what_the_spec_leaves_unset() -> None:
    spec = raw()
    assert defaulted_fields(spec) == {"spec.engine.image", "spec.gateway.image", "spec.devices.resourceName",
                                      "spec.devices.perNode", "spec.gateway.routing", "spec.gateway.serviceType",
                                      "spec.engine.resources.requests.cpu", "spec.engine.resources.limits.cpu"}
    out = resolve(spec, SITE)
    assert out.engine.image == SITE.engine_image and out.gateway.image == SITE.gateway_image
    assert out.devices.resource_name == "huawei.com/ascend-1980" and out.devices.per_node == 8
    assert out.gateway.routing == "prefix-aware" and out.gateway.service_type == "NodePort"
    assert spec.engine.image is None and spec.devices.resource_name is None  # the input is not modified
    given = raw(engine={"image": "mine:1"}, gateway={"routing": "session", "serviceType": "ClusterIP"},
                devices={"resourceName": "huawei.com/Ascend910", "perNode": 16})
    given = given.model_copy(update={"engine": given.engine.model_copy(update={"resources": {
        "requests": {"cpu": "4"}}})})
    assert defaulted_fields(given) == {"spec.gateway.image"}
    kept = resolve(given, SITE)
    assert (kept.engine.image, kept.gateway.routing, kept.gateway.service_type) == ("mine:1", "session", "ClusterIP")
    assert (kept.devices.resource_name, kept.devices.per_node) == ("huawei.com/Ascend910", 16)
    # the gateway image: the spec's, else the operator's default gateway image, else the resolved engine image
    assert kept.gateway.image == SITE.gateway_image
    assert resolve(given, BUILTIN).gateway.image == "mine:1"
    assert resolve(raw(), BUILTIN).gateway.image == "pypto-serving:latest"
    assert resolve(raw(gateway={"image": "gw:2"}), SITE).gateway.image == "gw:2"


def test_engine_cpu_defaults_fill_only_a_spec_that_names_no_cpu() -> None:
    site = OperatorDefaults(engine_cpu_request="2", engine_cpu_limit="32")
    assert resolve(raw(), site).engine.resources == {"requests": {"cpu": "2"}, "limits": {"cpu": "32"}}
    memory = {"requests": {"memory": "8Gi"}, "limits": {"memory": "16Gi"}}
    assert resolve(raw(engine={"resources": memory}), site).engine.resources == {
        "requests": {"memory": "8Gi", "cpu": "2"}, "limits": {"memory": "16Gi", "cpu": "32"}}
    for named in ({"requests": {"cpu": "64"}}, {"limits": {"cpu": "1"}}):  # never contradicts the spec
        assert resolve(raw(engine={"resources": named}), site).engine.resources == named
    assert resolve(raw(), OperatorDefaults(engine_cpu_limit="8")).engine.resources == {"limits": {"cpu": "8"}}
    assert resolve(raw()).engine.resources is None  # built in: none (upgrading the operator rolls nothing)
    spec, _ = validate(minimal(), site)
    assert spec is not None
    (container,) = d.engine_pod(d.Owner("demo", "ns1", "uid-1"), spec, 0)["spec"]["containers"]
    assert container["resources"]["limits"]["cpu"] == "32" and container["resources"]["requests"]["cpu"] == "2"
    assert [str(p) for p in check_defaults(OperatorDefaults(engine_cpu_limit="many"))] == [
        "--default-engine-cpu-limit: 'many' is not a valid quantity (e.g. 2 or 500m)"]


def test_builtin_defaults_are_the_old_crd_defaults_so_existing_pods_keep_their_hash() -> None:
    """Objects stored while the CRD defaulted these fields carry the values explicitly; a minimal object resolved
    with the built-in defaults must hash the same, or upgrading the operator would roll every replica."""
    stored = raw(devices={"resourceName": "huawei.com/Ascend910"}, engine={"image": "pypto-serving:latest"},
                 gateway={"routing": "least-pending-tokens", "serviceType": "ClusterIP"})
    assert resolve(raw()) == resolve(stored)
    assert d.spec_hash(resolve(raw())) == d.spec_hash(resolve(stored))
    # perNode only feeds validation: neither it nor the operator's default for it restarts replicas
    assert d.spec_hash(resolve(raw(), OperatorDefaults(devices_per_node=8))) == d.spec_hash(resolve(raw()))
    assert d.spec_hash(resolve(raw(devices={"perNode": 4}))) == d.spec_hash(resolve(raw()))
    # a new default engine image or device resource reaches the resources relying on it: a rolling update
    assert d.spec_hash(resolve(raw(), OperatorDefaults(engine_image="pypto-serving:0.2.0"))) != d.spec_hash(
        resolve(raw()))
    assert d.spec_hash(resolve(raw(engine={"image": "pinned:1"}), OperatorDefaults(engine_image="new:2"))) == \
        d.spec_hash(resolve(raw(engine={"image": "pinned:1"})))


def test_the_resolved_spec_shapes_pods_gateway_and_status() -> None:
    spec, problems = validate(minimal(), SITE)
    assert not problems and spec is not None
    owner = d.Owner("demo", "ns1", "uid-1")
    (container,) = d.engine_pod(owner, spec, 0)["spec"]["containers"]
    assert container["image"] == SITE.engine_image
    assert container["resources"]["limits"] == {"huawei.com/ascend-1980": "1"}
    objs = {o["kind"]: o for o in d.gateway_objects(owner, spec)}
    (gateway,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert gateway["image"] == SITE.gateway_image and gateway["args"][gateway["args"].index("--policy") + 1] == \
        "prefix-aware"
    assert objs["Service"]["spec"]["type"] == "NodePort"


def test_validation_names_the_field_when_a_given_value_is_bad_and_the_flag_for_a_default() -> None:
    _, problems = validate(minimal(devices={"resourceName": "Ascend910"}), SITE)
    assert [p.field for p in problems] == ["spec.devices.resourceName"] and "'Ascend910'" in problems[0].message
    _, problems = validate(minimal(gateway={"routing": "random"}), SITE)
    assert [p.field for p in problems] == ["spec.gateway.routing"]
    _, problems = validate(minimal(engine={"image": ""}), SITE)
    assert [p.field for p in problems] == ["spec.engine.image"]
    # the split check against perNode: the spec's value, or the operator's default (named by its flag)
    _, problems = validate(minimal(parallel={"tensorParallelSize": 9}), SITE)
    assert summary(problems) == ("spec.parallel.tensorParallelSize: tensorParallelSize x pipelineParallelSize = 9 "
                                 "devices span nodes (the operator's --default-devices-per-node = 8) but 9 devices do "
                                 "not split evenly into 2 pods of at most 8 devices (ceil(9 / 8) = 2 pods)")
    _, problems = validate(minimal(parallel={"tensorParallelSize": 9}, devices={"perNode": 8}), BUILTIN)
    assert "(spec.devices.perNode = 8)" in summary(problems)
    assert validate(minimal(parallel={"tensorParallelSize": 9}), BUILTIN)[1] == []  # no default: no check
    assert validate(minimal(parallel={"tensorParallelSize": 16}), SITE)[1] == []  # a group of 2 pods x 8
    # devices in engine.resources: the resolved (default) device resource is the one that counts
    _, problems = validate(minimal(engine={"resources": {"limits": {"huawei.com/ascend-1980": "1"}}}), SITE)
    assert [p.field for p in problems] == ["spec.engine.resources.limits.huawei.com/ascend-1980"]


def test_check_defaults_names_the_flag() -> None:
    assert check_defaults(BUILTIN) == [] and check_defaults(SITE) == []
    bad = OperatorDefaults(engine_image=" ", gateway_image="a b", device_resource_name="kubernetes.io/gpu",
                           devices_per_node=0, routing="random", gateway_service_type="Ingress")  # type: ignore[arg-type]
    assert [p.field for p in check_defaults(bad)] == [
        "--default-engine-image", "--default-gateway-image", "--default-device-resource",
        "--default-devices-per-node", "--default-routing", "--default-gateway-service-type"]


def test_cli_flags_make_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.parser().parse_args([
        "-A", "--default-engine-image", SITE.engine_image, "--default-gateway-image", str(SITE.gateway_image),
        "--default-device-resource", SITE.device_resource_name, "--default-devices-per-node", "8",
        "--default-routing", "prefix-aware", "--default-gateway-service-type", "NodePort"])
    assert cli.operator_defaults(args) == SITE
    assert cli.operator_defaults(cli.parser().parse_args(["-A"])) == BUILTIN
    with pytest.raises(SystemExit):
        cli.main(["-A", "--default-device-resource", "Ascend910"])
    assert "--default-device-resource: 'Ascend910' is not a valid extended resource name" in capsys.readouterr().err
