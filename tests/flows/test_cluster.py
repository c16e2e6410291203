"""pipeline/flows/cluster.py: the Kubernetes base job template with GPU requests."""

from __future__ import annotations

from pipeline.flows.cluster import kubernetes_job_template


def test_job_template_requests_gpus():
    tpl = kubernetes_job_template(gpus=2)
    container = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert tpl["variables"]["properties"]["gpu_count"]["default"] == 2
