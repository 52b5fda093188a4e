"""The API stand-in answers the real kubernetes client the way an API server does.

Every other integration test trusts these behaviours, so each one is shown here through the client.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, dynamic, watch
from kubernetes.client.exceptions import ApiException

from tests.standin import NAMESPACES, StandIn

GROUP, VERSION, PLURAL = "perch.dev", "v1alpha1", "canaries"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def canary(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Canary",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def deployment(name: str) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=2,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(
                    containers=[client.V1Container(name="app", image="podinfo:1")]
                ),
            ),
        ),
    )


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status"
    return body


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def crs(standin: StandIn) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(standin.api_client())


@pytest.fixture
def apps(standin: StandIn) -> client.AppsV1Api:
    return client.AppsV1Api(standin.api_client())


def test_create_answers_201_with_server_fields(standin: StandIn, crs, apps) -> None:
    created = crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a"))
    assert created["metadata"]["uid"]
    assert created["metadata"]["creationTimestamp"]
    assert created["metadata"]["namespace"] == "default"
    assert int(created["metadata"]["resourceVersion"]) > 0

    typed = apps.create_namespaced_deployment("default", deployment("podinfo"))
    assert typed.metadata.uid
    assert typed.metadata.resource_version
    assert typed.metadata.generation == 1
    assert standin.calls()[-1].status == 201


def test_create_of_an_existing_name_is_409_already_exists(crs) -> None:
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a"))
    with pytest.raises(ApiException) as err:
        crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a"))
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "AlreadyExists"


def test_missing_object_and_missing_namespace_are_404_status(crs) -> None:
    with pytest.raises(ApiException) as err:
        crs.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "nope")
    assert err.value.status == 404
    assert status_of(err.value)["reason"] == "NotFound"
    assert status_of(err.value)["message"] == 'canaries.perch.dev "nope" not found'

    with pytest.raises(ApiException) as err:
        crs.create_namespaced_custom_object(GROUP, VERSION, "nowhere", PLURAL, canary("a"))
    assert err.value.status == 404
    assert status_of(err.value)["message"] == 'namespaces "nowhere" not found'


def test_resource_version_grows_on_every_write(crs) -> None:
    seen = [crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a"))]
    for weight in (10, 20):
        seen.append(
            crs.patch_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, "a", {"spec": {"weight": weight}}
            )
        )
    versions = [int(obj["metadata"]["resourceVersion"]) for obj in seen]
    assert versions == sorted(set(versions))
    assert [obj["metadata"]["uid"] for obj in seen] == [seen[0]["metadata"]["uid"]] * 3


def test_replace_with_a_stale_resource_version_is_409(standin: StandIn) -> None:
    leases = client.CoordinationV1Api(standin.api_client())
    lease = leases.create_namespaced_lease(
        "default",
        client.V1Lease(
            metadata=client.V1ObjectMeta(name="perch-analyzer"),
            spec=client.V1LeaseSpec(holder_identity="pod-a"),
        ),
    )
    stale = leases.read_namespaced_lease("perch-analyzer", "default")
    lease.spec.holder_identity = "pod-b"
    won = leases.replace_namespaced_lease("perch-analyzer", "default", lease)
    assert won.spec.holder_identity == "pod-b"

    stale.spec.holder_identity = "pod-c"
    with pytest.raises(ApiException) as err:
        leases.replace_namespaced_lease("perch-analyzer", "default", stale)
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "Conflict"
    assert leases.read_namespaced_lease("perch-analyzer", "default").spec.holder_identity == "pod-b"


def test_merge_patch_with_a_stale_resource_version_is_409(crs) -> None:
    old = crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a", w=0))
    rv = old["metadata"]["resourceVersion"]
    crs.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "a",
        {"metadata": {"resourceVersion": rv}, "spec": {"w": 1}},
    )
    with pytest.raises(ApiException) as err:
        crs.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            "default",
            PLURAL,
            "a",
            {"metadata": {"resourceVersion": rv}, "spec": {"w": 2}},
        )
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "Conflict"
    assert crs.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")["spec"] == {
        "w": 1
    }


def test_merge_patch_null_removes_a_key_and_a_scalar_replaces_a_map(crs) -> None:
    crs.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, canary("a", x={"y": 1}, z=1)
    )
    patched = crs.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", {"spec": {"x": "flat", "z": None}}
    )
    assert patched["spec"] == {"x": "flat"}


def test_json_patch_with_a_resource_version_test_op(crs) -> None:
    old = crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a", w=0))
    ops = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": old["metadata"]["resourceVersion"],
        },
        {"op": "replace", "path": "/spec/w", "value": 5},
    ]
    new = crs.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", ops, _content_type=JSON_PATCH
    )
    assert new["spec"] == {"w": 5}

    with pytest.raises(ApiException) as err:  # the same ops again: the version moved on
        crs.patch_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, "a", ops, _content_type=JSON_PATCH
        )
    assert err.value.status == 422
    assert status_of(err.value)["reason"] == "Invalid"


def test_typed_patch_needs_an_explicit_content_type(apps) -> None:
    # kubernetes 37 sends a typed patch with a dict body as strategic merge unless told otherwise,
    # and strategic merge is refused here rather than approximated.
    apps.create_namespaced_deployment("default", deployment("podinfo"))
    with pytest.raises(ApiException) as err:
        apps.patch_namespaced_deployment("podinfo", "default", {"spec": {"replicas": 3}})
    assert err.value.status == 415
    assert "strategic-merge-patch" in status_of(err.value)["message"]

    patched = apps.patch_namespaced_deployment(
        "podinfo", "default", {"spec": {"replicas": 3}}, _content_type=MERGE
    )
    assert patched.spec.replicas == 3
    assert patched.metadata.generation == 2


def test_a_patch_body_of_the_wrong_shape_is_400(crs) -> None:
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a"))
    ops = [{"op": "replace", "path": "/spec", "value": {}}]
    with pytest.raises(ApiException) as err:  # the client's default for custom objects is merge
        crs.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", ops)
    assert err.value.status == 400


def test_label_selectors(crs) -> None:
    for name, labels in [("a", {"app": "x", "track": "canary"}), ("b", {"app": "x"}), ("c", {})]:
        crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary(name, labels))

    def names(selector: str) -> list[str]:
        found = crs.list_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, label_selector=selector
        )
        return [item["metadata"]["name"] for item in found["items"]]

    assert names("") == ["a", "b", "c"]
    assert names("app=x,track") == ["a"]
    assert names("app==x,!track") == ["b"]
    assert names("track!=canary") == ["b", "c"]
    assert names("app in (x, y)") == ["a", "b"]
    assert names("app notin (x)") == ["c"]
    with pytest.raises(ApiException) as err:
        names("app=(")
    assert err.value.status == 400


def test_status_subresource_is_the_only_way_to_write_status(crs) -> None:
    crs.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, {**canary("a", w=0), "status": {"phase": "Dropped"}}
    )
    obj = crs.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert "status" not in obj

    obj = crs.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        "a",
        {"status": {"phase": "Progressing"}, "spec": {"w": 9}},
    )
    assert obj["status"] == {"phase": "Progressing"}
    assert obj["spec"] == {"w": 0}  # ignored on the status endpoint
    assert obj["metadata"]["generation"] == 1  # a status write is not a new generation

    obj = crs.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", {"status": {"phase": "Lost"}, "spec": {"w": 1}}
    )
    assert obj["status"] == {"phase": "Progressing"}  # ignored on the main endpoint
    assert obj["metadata"]["generation"] == 2

    obj["status"] = {"phase": "Succeeded"}
    replaced = crs.replace_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "a", obj
    )
    assert replaced["status"] == {"phase": "Succeeded"}
    with pytest.raises(ApiException) as err:  # obj's resourceVersion is now stale
        crs.replace_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "a", obj)
    assert err.value.status == 409


def test_deployment_status_subresource(apps) -> None:
    apps.create_namespaced_deployment("default", deployment("podinfo"))
    apps.patch_namespaced_deployment_status(
        "podinfo",
        "default",
        {"status": {"readyReplicas": 2, "observedGeneration": 1}},
        _content_type=MERGE,
    )
    read = apps.read_namespaced_deployment_status("podinfo", "default")
    assert read.status.ready_replicas == 2
    assert read.status.observed_generation == read.metadata.generation


def test_watch_streams_added_modified_deleted_live(standin: StandIn, crs) -> None:
    events: list[tuple[str, Any]] = []
    stream = watch.Watch()

    def consume() -> None:
        for event in stream.stream(
            crs.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL, timeout_seconds=10
        ):
            events.append((event["type"], event["object"]["spec"]))
            if event["type"] == "DELETED":
                stream.stop()

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_until(lambda: any(c.verb == "watch" and c.status == 200 for c in standin.calls()))
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a", w=0))
    crs.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a", {"spec": {"w": 1}})
    crs.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    consumer.join(10)
    assert events == [("ADDED", {"w": 0}), ("MODIFIED", {"w": 1}), ("DELETED", {"w": 1})]


def test_watch_resumes_after_a_resource_version(apps) -> None:
    apps.create_namespaced_deployment("default", deployment("before"))
    listed = apps.list_namespaced_deployment("default")
    apps.create_namespaced_deployment("default", deployment("after"))
    apps.delete_namespaced_deployment("before", "default")

    stream = watch.Watch()
    seen = []
    for event in stream.stream(
        apps.list_namespaced_deployment,
        "default",
        resource_version=listed.metadata.resource_version,
        timeout_seconds=5,
    ):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            stream.stop()
    assert seen == [("ADDED", "after"), ("DELETED", "before")]


def test_filtered_watch_sees_an_object_leave_its_selection(crs) -> None:
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a", {"on": "1"}))
    crs.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", {"metadata": {"labels": {"on": None}}}
    )
    stream = watch.Watch()
    seen = []
    for event in stream.stream(
        crs.list_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        PLURAL,
        label_selector="on",
        resource_version="0",
        timeout_seconds=1,
    ):
        seen.append(event["type"])
    assert seen == []  # no longer selected: not even listed

    seen = []
    for event in stream.stream(
        crs.list_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        PLURAL,
        label_selector="on",
        resource_version="1",
        timeout_seconds=5,
    ):
        seen.append(event["type"])
        if len(seen) == 2:
            stream.stop()
    assert seen == ["ADDED", "DELETED"]


def test_an_expired_watch_is_an_error_event(standin: StandIn, crs) -> None:
    standin.fail("watch", "canaries", status=410)
    with pytest.raises(ApiException) as err:
        list(
            watch.Watch().stream(
                crs.list_namespaced_custom_object,
                GROUP,
                VERSION,
                "default",
                PLURAL,
                timeout_seconds=1,
            )
        )
    assert err.value.status == 410
    assert standin.calls()[-1].status == 200  # the stream itself was fine


def test_timeout_seconds_ends_a_quiet_watch(crs) -> None:
    events: list[Any] = []
    consumer = threading.Thread(
        target=lambda: events.extend(
            watch.Watch().stream(
                crs.list_namespaced_custom_object,
                GROUP,
                VERSION,
                "default",
                PLURAL,
                timeout_seconds=1,
            )
        )
    )
    consumer.start()
    consumer.join(30)  # a liveness bound, far above the 1s asked for
    assert not consumer.is_alive()
    assert events == []


def test_delete_answers_as_the_api_server_does(standin: StandIn, crs, apps) -> None:
    core = client.CoreV1Api(standin.api_client())
    core.create_namespaced_service("test", client.V1Service(metadata=client.V1ObjectMeta(name="s")))
    assert core.delete_namespaced_service("s", "test").metadata.name == "s"
    apps.create_namespaced_deployment("test", deployment("d"))
    assert apps.delete_namespaced_deployment("d", "test")["status"] == "Success"
    crs.create_namespaced_custom_object(GROUP, VERSION, "test", PLURAL, canary("c"))
    assert (
        crs.delete_namespaced_custom_object(GROUP, VERSION, "test", PLURAL, "c")["kind"] == "Canary"
    )
    assert standin.objects("services") == standin.objects(PLURAL) == {}


def test_finalizers_hold_deletion_until_removed(crs) -> None:
    crs.create_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        {**canary("a"), "metadata": {"name": "a", "finalizers": ["f"]}},
    )
    held = crs.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert held["metadata"]["deletionTimestamp"]
    crs.patch_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, "a", {"metadata": {"finalizers": None}}
    )
    with pytest.raises(ApiException) as err:
        crs.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "a")
    assert err.value.status == 404


def test_version_and_discovery(standin: StandIn) -> None:
    api = standin.api_client()
    assert client.VersionApi(api).get_code().git_version == "v1.31.0"

    discovered = dynamic.DynamicClient(api).resources
    assert discovered.get(api_version=f"{GROUP}/{VERSION}", kind="Canary").namespaced
    assert not discovered.get(
        api_version="admissionregistration.k8s.io/v1", kind="MutatingWebhookConfiguration"
    ).namespaced
    assert discovered.get(api_version="gateway.networking.k8s.io/v1", kind="HTTPRoute").namespaced
    assert discovered.get(api_version="v1", kind="Secret").namespaced


def test_what_the_stand_in_does_not_serve_is_refused_cleanly(standin: StandIn, crs) -> None:
    with pytest.raises(ApiException) as err:
        crs.delete_collection_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert err.value.status == 405
    with pytest.raises(ApiException) as err:
        crs.list_namespaced_custom_object("example.com", "v1", "default", "widgets")
    assert err.value.status == 404
    assert standin.crashes() == []


def test_cluster_scoped_resources(standin: StandIn) -> None:
    admission = client.AdmissionregistrationV1Api(standin.api_client())
    admission.create_mutating_webhook_configuration(
        client.V1MutatingWebhookConfiguration(
            metadata=client.V1ObjectMeta(name="perch"), webhooks=[]
        )
    )
    assert [m.metadata.name for m in admission.list_mutating_webhook_configuration().items] == [
        "perch"
    ]
    assert ("mutatingwebhookconfigurations", None, "perch") in standin.objects()


def test_fault_injection_changes_nothing(standin: StandIn, crs) -> None:
    crs.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, canary("a"))
    before = standin.objects()
    standin.fail("patch", "canaries/status", status=503, times=1)

    with pytest.raises(ApiException) as err:
        crs.patch_namespaced_custom_object_status(
            GROUP, VERSION, "default", PLURAL, "a", {"status": {"phase": "Failed"}}
        )
    assert err.value.status == 503
    assert standin.objects() == before

    crs.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "a", {"status": {"phase": "Failed"}}
    )  # once only
    assert [(c.verb, c.resource, c.status) for c in standin.writes()] == [
        ("create", "canaries", 201),
        ("patch", "canaries/status", 503),
        ("patch", "canaries/status", 200),
    ]
    assert [kind for kind, _ in standin.history("canaries")] == ["ADDED", "MODIFIED"]


def test_dry_run_and_reads_change_nothing(standin: StandIn, crs) -> None:
    before = standin.objects()
    created = crs.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, canary("a"), dry_run="All"
    )
    assert created["metadata"]["name"] == "a"
    crs.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    assert standin.objects() == before
    assert [(c.verb, c.dry_run) for c in standin.writes()] == [("create", True)]


def test_kubeconfig_points_clients_at_the_stand_in(standin: StandIn, tmp_path: Path) -> None:
    path = standin.kubeconfig(tmp_path / "kubeconfig")
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=configuration)
    names = [
        n.metadata.name
        for n in client.CoreV1Api(client.ApiClient(configuration)).list_namespace().items
    ]
    assert names == sorted(NAMESPACES)

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the Python client half of this test passed")
    client.CustomObjectsApi(standin.api_client()).create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, canary("podinfo")
    )
    done = subprocess.run(
        [kubectl, "get", "canaries", "-A", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"KUBECONFIG": str(path), "HOME": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["canary.perch.dev/podinfo"]
