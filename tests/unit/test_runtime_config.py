"""The Docker create request as docker-py builds it (no daemon needed for this layer)."""

from __future__ import annotations

import docker

from cloudai.gpus import detect_gpus, parse_nvidia_smi
from cloudai.models import MiB
from cloudai.runtime import ContainerSpec, _split_tag, container_labels, host_config_args


def _spec(**kw: object) -> ContainerSpec:
    base = dict(image="img", command="echo hi", cpus=1.5, memory=64 * MiB, task_id="t1", worker_id="w1")
    base.update(kw)
    return ContainerSpec(**base)  # type: ignore[arg-type]


def test_limits_become_docker_host_config() -> None:
    api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41")
    hc = api.create_host_config(**host_config_args(_spec(gpu_ids=["1", "3"])))
    assert hc["NanoCpus"] == 1_500_000_000
    assert hc["Memory"] == 64 * MiB and hc["MemorySwap"] == 64 * MiB
    assert hc["PidsLimit"] == 4096
    assert hc["SecurityOpt"] == ["no-new-privileges"]
    assert hc["DeviceRequests"] == [
        {"Driver": "", "Count": 0, "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert "AutoRemove" not in hc or hc["AutoRemove"] is False


def test_no_gpus_means_no_device_request() -> None:
    assert "device_requests" not in host_config_args(_spec())


def test_labels_identify_task_and_worker() -> None:
    assert container_labels(_spec(labels={"team": "ml"})) == {
        "team": "ml", "cloudai.task_id": "t1", "cloudai.worker_id": "w1"}


def test_gpu_inventory_from_configuration_and_nvidia_smi() -> None:
    assert detect_gpus("none") == []
    assert detect_gpus("0,1") == ["0", "1"]
    out = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)\n"
    assert parse_nvidia_smi(out) == ["0", "1"]


def test_image_tags() -> None:
    assert _split_tag("busybox") == ("busybox", "latest")
    assert _split_tag("reg:5000/a/b:1.2") == ("reg:5000/a/b", "1.2")
    assert _split_tag("reg:5000/a/b") == ("reg:5000/a/b", "latest")


def test_capabilities_are_dropped_to_the_documented_default() -> None:
    from cloudai.limits import DEFAULT_CAPS, capabilities

    api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41")
    hc = api.create_host_config(**host_config_args(_spec()))
    assert hc["CapDrop"] == ["ALL"] and set(hc["CapAdd"]) == set(DEFAULT_CAPS)
    assert "NET_RAW" not in DEFAULT_CAPS and "SYS_ADMIN" not in DEFAULT_CAPS
    assert "ReadonlyRootfs" not in hc and "Tmpfs" not in hc
    assert capabilities(drop=["ALL"], add=["SYS_PTRACE"]) == ["SYS_PTRACE"]
    assert capabilities(drop=["CHOWN"], add=["NET_RAW"]) == [  # in bit order
        "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP", "NET_BIND_SERVICE", "NET_RAW",
        "SYS_CHROOT", "MKNOD", "AUDIT_WRITE", "SETFCAP"]


def test_read_only_root_keeps_a_writable_tmp() -> None:
    api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41")
    hc = api.create_host_config(**host_config_args(_spec(read_only=True)))
    assert hc["ReadonlyRootfs"] is True
    assert hc["Tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={64 * MiB}"}


def test_nvidia_visible_devices_is_forced() -> None:
    from cloudai.runtime import container_env

    assert container_env(_spec(env={"A": "1"}))["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert container_env(_spec(gpu_ids=["1", "3"]))["NVIDIA_VISIBLE_DEVICES"] == "1,3"
    assert container_env(_spec(env={"NVIDIA_VISIBLE_DEVICES": "all"}))["NVIDIA_VISIBLE_DEVICES"] == "void"
