"""What the Lambda Cloud modules share: the api_key/api_url options, the client, failures, results."""

from __future__ import annotations

import traceback

from ansible.module_utils.basic import env_fallback, missing_required_lib

try:
    from ansible.module_utils.lambda_cloud import LambdaCloudClient, LambdaCloudError
except ImportError:  # requests is missing on the host that runs the module
    LambdaCloudClient = LambdaCloudError = None
    IMPORT_ERROR = traceback.format_exc()
else:
    IMPORT_ERROR = None


def lambda_cloud_argument_spec():
    return {
        "api_key": {"type": "str", "no_log": True, "fallback": (env_fallback, ["LAMBDA_API_KEY"])},
        "api_url": {"type": "str", "fallback": (env_fallback, ["LAMBDA_API_URL"])},
    }


class LambdaCloudModule:
    """Base of every module: owns the AnsibleModule, the client and the result."""

    def __init__(self, module):
        self.module = module
        self.result = {"changed": False}
        if IMPORT_ERROR:
            module.fail_json(msg=missing_required_lib("requests"), exception=IMPORT_ERROR)
        try:
            self.client = LambdaCloudClient(module.params["api_key"], base_url=module.params["api_url"])
        except LambdaCloudError as exc:
            self.fail(exc)

    def _mark_as_changed(self):
        self.result["changed"] = True

    def fail(self, exc, msg=None, **extra):
        """Fail with the client's message (what failed, what to do) and the API's code for machines."""
        failure = {"code": exc.code, "status": exc.status, "message": exc.message, "suggestion": exc.suggestion}
        self.module.fail_json(msg=msg or str(exc), failure=failure, **self.result, **extra)

    def exit(self):
        self.module.exit_json(**self.result)


def instance_summary(instance):
    """One flat, JSON-safe dict per instance: what playbooks and `lt` read."""
    instance_type = instance.get("instance_type") or {}
    return {
        "id": instance.get("id"),
        "name": instance.get("name"),
        "ip": instance.get("ip"),
        "private_ip": instance.get("private_ip"),
        "status": instance.get("status"),
        "region": (instance.get("region") or {}).get("name"),
        "instance_type": instance_type.get("name"),
        "price_cents_per_hour": instance_type.get("price_cents_per_hour"),
        "gpu_description": instance_type.get("gpu_description"),
        "hostname": instance.get("hostname"),
        "ssh_key_names": instance.get("ssh_key_names") or [],
        "file_system_names": instance.get("file_system_names") or [],
    }
