"""A loopback fake of the Lambda Cloud API v1, faithful to the published contract.

Shapes, error codes and lifecycles follow Lambda's OpenAPI spec: ``{"data"}`` / ``{"error"}``
envelopes, 32-hex instance ids, instances booting -> active (with an ip) -> terminating ->
terminated (then gone from the listing), capacity per type and region, quota, launch rate limit,
and 401 for any wrong key. Tests inject bursts of 429 / 5xx / coded errors with ``fail_next``.

In a test::

    with FakeLambdaAPI(api_key="k", boot_seconds=0.2) as api:
        LambdaCloudClient("k", base_url=api.url)...

As a process (prints its base URL on the first line of stdout)::

    python3 -m tests.fakes.lambda_api --port 0 --api-key KEY --boot-seconds 1 --ip 127.0.0.1 --state FILE
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import secrets
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "/api/v1"

REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "us-west-2": "Arizona, USA",
    "us-west-3": "Utah, USA",
    "us-south-1": "Texas, USA",
    "europe-central-1": "Germany",
    "asia-northeast-1": "Tokyo, Japan",
}

# name: (gpu description, cents per hour, vcpus, memory GiB, storage GiB, gpus)
INSTANCE_TYPES = {
    "cpu_4x_general": ("", 20, 4, 16, 100, 0),
    "gpu_1x_a10": ("A10 (24 GB PCIe)", 75, 30, 200, 1400, 1),
    "gpu_1x_a6000": ("RTX A6000 (48 GB)", 80, 14, 46, 512, 1),
    "gpu_1x_a100_sxm4": ("A100 (40 GB SXM4)", 129, 30, 200, 512, 1),
    "gpu_1x_gh200": ("GH200 (96 GB)", 149, 64, 432, 4096, 1),
    "gpu_1x_h100_pcie": ("H100 (80 GB PCIe)", 249, 26, 200, 1024, 1),
    "gpu_1x_h100_sxm5": ("H100 (80 GB SXM5)", 329, 26, 225, 2816, 1),
    "gpu_8x_a100_80gb_sxm4": ("A100 (80 GB SXM4)", 1432, 240, 1800, 20480, 8),
    "gpu_8x_h100_sxm5": ("H100 (80 GB SXM5)", 2392, 208, 1800, 24780, 8),
}

# family: (name, description, version, created). Every region offers both until a test says otherwise.
IMAGE_FAMILIES = {
    "lambda-stack-22-04": ("Lambda Stack 22.04", "Ubuntu 22.04 LTS with Lambda Stack (Python 3.10)",
                           "2026.09.1", "2026-09-03T17:12:40Z"),
    "lambda-stack-24-04": ("Lambda Stack 24.04", "Ubuntu 24.04 LTS with Lambda Stack (Python 3.12)",
                           "2026.10.2", "2026-10-21T09:48:05Z"),
}
# What an instance boots when the launch names no image, as the real API does.
API_DEFAULT_IMAGE_FAMILY = "lambda-stack-22-04"

LIVE = ("booting", "active", "unhealthy")
ERROR_STATUS = {
    "global/invalid-api-key": 401,
    "global/account-inactive": 403,
    "global/object-does-not-exist": 404,
    "global/internal-error": 500,
    "global/unknown": 500,
}


class ApiError(Exception):
    def __init__(self, code, message, status=None, headers=None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or ERROR_STATUS.get(code, 400)
        self.headers = headers or {}


class FakeLambdaAPI:
    def __init__(self, api_key="test-api-key", *, boot_seconds=0.5, instance_ip="127.0.0.1",
                 launch_interval=0.0, terminate_seconds=0.2, forget_seconds=2.0, capacity=None,
                 quota=None, state_file=None, port=0, ssh_port=None, image_families=None):
        self.api_key = api_key
        self.boot_seconds = boot_seconds
        self.instance_ip = instance_ip
        self.launch_interval = launch_interval
        self.terminate_seconds = terminate_seconds
        self.forget_seconds = forget_seconds
        self.quota = quota  # most live instances at once; None is unlimited
        self.state_file = state_file
        self.ssh_port = ssh_port  # not part of the API: recorded in the state file for tests
        self.account_active = True
        # Every type has capacity everywhere until a test says otherwise.
        self.capacity = {name: list(REGIONS) for name in INSTANCE_TYPES}
        self.capacity.update(capacity or {})
        self.image_families = {region: list(IMAGE_FAMILIES) for region in REGIONS}
        self.image_families.update(image_families or {})
        # id -> the image an instance booted. Not part of the API's Instance: for test assertions only.
        self.instance_images = {}
        self._instances = {}  # id -> Instance (public shape), terminated ones included
        self.ssh_keys = []
        self.file_systems = []
        self.requests = []  # (method, path under /api/v1, JSON body or None)
        self.log = []  # access-log lines, as http.server would print them
        self.unauthorized = []  # (method, path) of requests refused with 401
        self.crashes = []  # exceptions raised by the fake itself (a test should assert none)
        self._clock = {}  # id -> {"booted": t, "ended": t}
        self._failures = []  # [path_prefix, status, code, times, headers, after, message]
        self._last_launch = None
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self._server.daemon_threads = True
        self._server.api = self
        self._thread = None

    # -- test controls ---------------------------------------------------------------------

    @property
    def url(self):
        return f"http://127.0.0.1:{self._server.server_address[1]}{PREFIX}"

    def start(self):
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self._save()
        return self

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set_capacity(self, type_name, regions):
        """Regions where ``type_name`` has capacity; launches elsewhere answer insufficient-capacity."""
        with self._lock:
            self.capacity[type_name] = list(regions)

    def set_image_families(self, region, families):
        """Image families ``region`` offers; a launch there naming another answers invalid-parameters."""
        with self._lock:
            self.image_families[region] = list(families)

    def fail_next(self, path_prefix, status, code=None, times=1, headers=None, after=False, message=None):
        """Answer the next ``times`` requests under ``path_prefix`` with ``status`` (``{}`` body without
        a code). ``after=True`` carries the request out first: the answer is lost, the effect is not."""
        with self._lock:
            self._failures.append([path_prefix, status, code, times, headers or {}, after, message])

    def add_ssh_key(self, name, public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTests test"):
        with self._lock:
            key = {"id": secrets.token_hex(16), "name": name, "public_key": public_key}
            self.ssh_keys.append(key)
            self._save()
            return key

    def add_file_system(self, name, region="us-east-1"):
        with self._lock:
            fs = {"id": secrets.token_hex(16), "name": name, "mount_point": f"/lambda/nfs/{name}",
                  "created": _now(), "created_by": {"id": "u", "email": "user@example.com", "status": "active"},
                  "is_in_use": False, "region": _region(region), "bytes_used": 0}
            self.file_systems.append(fs)
            return fs

    @property
    def instances(self):
        """Every instance launched, id -> Instance as the API shows it now (terminated ones too)."""
        with self._lock:
            self._refresh()
            return self._instances

    def requests_to(self, method, path_prefix=""):
        return [r for r in self.requests if r[0] == method and r[1].startswith(path_prefix)]

    # -- lifecycle ---------------------------------------------------------------------------

    def _refresh(self):
        """Move instances along booting -> active and terminating -> terminated as time passes."""
        now, changed = time.monotonic(), False
        for iid, inst in self._instances.items():
            clock = self._clock[iid]
            if inst["status"] == "booting" and now - clock["booted"] >= self.boot_seconds:
                inst.update(status="active", ip=self.instance_ip, private_ip=f"10.19.{int(iid[:2], 16)}.{int(iid[2:4], 16)}",
                            hostname=self.instance_ip.replace(".", "-"),
                            jupyter_url=f"https://jupyter-{iid[:8]}.lambdaspaces.com/?token={clock['jupyter']}")
                changed = True
            elif inst["status"] == "terminating" and now - clock["ended"] >= self.terminate_seconds:
                inst["status"] = "terminated"
                changed = True
        if changed:
            self._save()

    def _visible(self, inst):
        clock = self._clock[inst["id"]]
        gone = self.terminate_seconds + self.forget_seconds
        return inst["status"] != "terminated" or time.monotonic() - clock["ended"] < gone

    def _find(self, iid):
        inst = self._instances.get(iid)
        if inst is None or not self._visible(inst):
            raise ApiError("global/object-does-not-exist", f"Instance {iid} does not exist.")
        return inst

    def _save(self):
        if not self.state_file:
            return
        state = {"url": self.url, "ssh_port": self.ssh_port, "instances": list(self._instances.values()),
                 "ssh_keys": self.ssh_keys, "instance_images": self.instance_images,
                 "launches": len(self.requests_to("POST", "/instance-operations/launch"))}
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self.state_file)

    # -- endpoints -----------------------------------------------------------------------------

    def get_instance_types(self, body):
        return {name: {"instance_type": _instance_type(name),
                       "regions_with_capacity_available": [_region(r) for r in self.capacity.get(name, [])]}
                for name in INSTANCE_TYPES}

    def post_launch(self, body):
        now = time.monotonic()
        if self.launch_interval and self._last_launch and now - self._last_launch < self.launch_interval:
            wait = self.launch_interval - (now - self._last_launch)
            raise ApiError("global/rate-limited", "Too many launch requests.", 429,
                           {"Retry-After": str(math.ceil(wait))})
        self._last_launch = now
        region, type_name = body.get("region_name"), body.get("instance_type_name")
        keys, name = body.get("ssh_key_names") or [], body.get("name")
        if body.get("quantity", 1) != 1:
            raise ApiError("global/invalid-parameters", "Only one instance can be launched per request.")
        if region not in REGIONS:
            raise ApiError("global/invalid-parameters", f"Invalid region name {region!r}.")
        if type_name not in INSTANCE_TYPES:
            raise ApiError("global/invalid-parameters", f"Invalid instance type name {type_name!r}.")
        if len(keys) != 1:
            raise ApiError("global/invalid-parameters", "Exactly one SSH key name must be given.")
        if keys[0] not in {k["name"] for k in self.ssh_keys}:
            raise ApiError("global/invalid-parameters", f"SSH key {keys[0]!r} does not exist.")
        if name is not None and (not isinstance(name, str) or len(name) > 64):
            raise ApiError("global/invalid-parameters", "Instance name must be at most 64 characters.")
        image = self._launch_image(body.get("image"), region)
        file_systems = body.get("file_system_names") or []
        for fs_name in file_systems:
            fs = next((f for f in self.file_systems if f["name"] == fs_name), None)
            if fs is None:
                raise ApiError("global/object-does-not-exist", f"File system {fs_name!r} does not exist.")
            if fs["region"]["name"] != region:
                raise ApiError("instance-operations/launch/file-system-in-wrong-region",
                               f"File system {fs_name!r} is in {fs['region']['name']}, not {region}.")
        live = [i for i in self._instances.values() if i["status"] in LIVE]
        if self.quota is not None and len(live) >= self.quota:
            raise ApiError("global/quota-exceeded", "Instance quota exceeded.")
        if region not in self.capacity.get(type_name, []):
            raise ApiError("instance-operations/launch/insufficient-capacity",
                           "Not enough capacity to fulfill launch request.")
        iid = secrets.token_hex(16)
        self._instances[iid] = {
            "id": iid, "name": name, "ip": None, "private_ip": None, "status": "booting",
            "ssh_key_names": keys, "file_system_names": file_systems, "region": _region(region),
            "instance_type": _instance_type(type_name), "hostname": None, "jupyter_token": None,
            "jupyter_url": None, "is_reserved": False, "tags": body.get("tags") or [],
            "actions": {a: {"available": True} for a in ("migrate", "rebuild", "restart", "cold_reboot", "terminate")},
        }
        self.instance_images[iid] = image
        self._clock[iid] = {"booted": now, "ended": None, "jupyter": secrets.token_hex(8)}
        self._save()
        return {"instance_ids": [iid]}

    def get_instances(self, body):
        return [i for i in self._instances.values() if self._visible(i)]

    def get_instance(self, body, iid):
        return self._find(iid)

    def _ids(self, body):
        ids = body.get("instance_ids")
        if not isinstance(ids, list) or not ids:
            raise ApiError("global/invalid-parameters", "instance_ids must be a non-empty list.")
        return [self._find(iid) for iid in ids]

    def post_terminate(self, body):
        found = self._ids(body)
        for inst in found:
            if inst["status"] not in ("terminating", "terminated"):
                inst["status"] = "terminating"
                self._clock[inst["id"]]["ended"] = time.monotonic()
        self._save()
        return {"terminated_instances": found}

    def post_restart(self, body):
        found = self._ids(body)
        for inst in found:
            if inst["status"] not in LIVE:
                raise ApiError("global/invalid-parameters", f"Instance {inst['id']} cannot be restarted.")
            inst.update(status="booting", ip=None)
            self._clock[inst["id"]]["booted"] = time.monotonic()
        self._save()
        return {"restarted_instances": found}

    def get_ssh_keys(self, body):
        return self.ssh_keys

    def post_ssh_keys(self, body):
        name = body.get("name")
        if not name or any(k["name"] == name for k in self.ssh_keys):
            raise ApiError("global/invalid-parameters", f"Invalid or duplicate SSH key name {name!r}.")
        if body.get("public_key"):
            return self.add_ssh_key(name, body["public_key"])
        material = secrets.token_urlsafe(48)
        key = dict(self.add_ssh_key(name, f"ssh-ed25519 {material} {name}"))
        key["private_key"] = f"-----BEGIN OPENSSH PRIVATE KEY-----\n{material}\n-----END OPENSSH PRIVATE KEY-----\n"  # fake key
        return key

    def delete_ssh_key(self, body, key_id):
        key = next((k for k in self.ssh_keys if k["id"] == key_id), None)
        if key is None:
            raise ApiError("global/object-does-not-exist", f"SSH key {key_id} does not exist.")
        self.ssh_keys.remove(key)
        self._save()
        return {}

    def get_images(self, body):
        return [_image(family, region) for region, families in self.image_families.items() for family in families]

    def _launch_image(self, requested, region):
        """The image a launch boots: ``{"family"}`` or ``{"id"}`` offered in ``region``, or the default."""
        if requested is None:
            requested = {"family": API_DEFAULT_IMAGE_FAMILY}
        if not (isinstance(requested, dict) and len(requested) == 1 and set(requested) <= {"id", "family"}
                and isinstance(next(iter(requested.values())), str)):
            raise ApiError("global/invalid-parameters", 'image must be {"id": ...} or {"family": ...}.')
        key, value = next(iter(requested.items()))
        offered = [_image(family, region) for family in self.image_families.get(region, [])]
        found = next((image for image in offered if image[key] == value), None)
        if found is None:
            raise ApiError("global/invalid-parameters", f"Image {key} {value!r} is not available in {region}.")
        return found

    def get_file_systems(self, body):
        return self.file_systems

    ROUTES = (
        ("GET", r"/instance-types", get_instance_types),
        ("POST", r"/instance-operations/launch", post_launch),
        ("GET", r"/instances", get_instances),
        ("GET", r"/instances/([0-9a-f]+)", get_instance),
        ("POST", r"/instance-operations/terminate", post_terminate),
        ("POST", r"/instance-operations/restart", post_restart),
        ("GET", r"/ssh-keys", get_ssh_keys),
        ("POST", r"/ssh-keys", post_ssh_keys),
        ("DELETE", r"/ssh-keys/([0-9a-zA-Z-]+)", delete_ssh_key),
        ("GET", r"/images", get_images),
        ("GET", r"/file-systems", get_file_systems),
    )

    def handle(self, method, path, headers, body):
        """Returns (status, JSON text, extra headers) for one request; serialised under the lock, as
        other threads move the same instances along."""
        with self._lock:
            self.requests.append((method, path, body))
            try:
                if not self._authorized(headers.get("Authorization", "")):
                    self.unauthorized.append((method, path))
                    raise ApiError("global/invalid-api-key", "API key was invalid, expired, or deleted.")
                if not self.account_active:
                    raise ApiError("global/account-inactive", "Your account is inactive.")
                failure = self._injected_failure(path)
                if failure and not failure.after:
                    raise failure
                self._refresh()
                data = self._route(method, path, body)
                if failure:
                    raise failure
                return 200, json.dumps({"data": data}), {}
            except Exception as exc:  # a bug in the fake: answer 500 and keep it for the test to see
                if not isinstance(exc, ApiError):
                    self.crashes.append(repr(exc))
                    exc = ApiError("global/internal-error", "Fake crashed.", 500)
                if exc.code is None:
                    return exc.status, "{}", exc.headers
                error = {"code": exc.code, "message": exc.message}
                return exc.status, json.dumps({"error": error}), exc.headers

    def _route(self, method, path, body):
        for route_method, pattern, func in self.ROUTES:
            match = re.fullmatch(pattern, path)
            if match and route_method == method:
                if method == "POST" and not isinstance(body, dict):
                    raise ApiError("global/invalid-parameters", "Request body must be a JSON object.")
                return func(self, body, *match.groups())
        raise ApiError("global/not-found", f"No route {method} {path}.", 404)

    def _authorized(self, header):
        scheme, _, token = header.partition(" ")
        if scheme == "Bearer":
            return secrets.compare_digest(token, self.api_key)
        if scheme == "Basic":
            user = base64.b64decode(token.encode() + b"==").decode(errors="replace").partition(":")[0]
            return secrets.compare_digest(user, self.api_key)
        return False

    def _injected_failure(self, path):
        for failure in self._failures:
            prefix, status, code, times, headers, after, message = failure
            if path.startswith(prefix) and times > 0:
                failure[3] -= 1
                error = ApiError(code, message or f"Injected failure {status}.", status, headers)
                error.after = after
                return error
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self):
        api = self.server.api
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        path = self.path.split("?", 1)[0]
        if path.startswith(PREFIX):
            status, payload, headers = api.handle(self.command, path[len(PREFIX):], self.headers, body)
        else:
            status, payload, headers = 404, "{}", {}
        data = payload.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PUT = _serve

    def log_message(self, fmt, *args):
        self.server.api.log.append(fmt % args)


def _region(name):
    return {"name": name, "description": REGIONS.get(name, name)}


def _instance_type(name):
    gpu, cents, vcpus, memory, storage, gpus = INSTANCE_TYPES[name]
    description = f"{gpus}x {gpu}" if gpus else "CPU only"
    return {"name": name, "description": description, "gpu_description": gpu, "price_cents_per_hour": cents,
            "specs": {"vcpus": vcpus, "memory_gib": memory, "storage_gib": storage, "gpus": gpus}}


def _image(family, region):
    name, description, version, created = IMAGE_FAMILIES[family]
    # One image per family and region, with an id that stays the same across runs of the fake.
    image_id = hashlib.md5(f"{family}/{region}".encode()).hexdigest()
    return {"id": image_id, "created_time": created, "updated_time": created, "name": name,
            "description": description, "family": family, "version": version, "architecture": "x86_64",
            "region": _region(region)}


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _mapping(items):
    """["A=x,y", "B="] -> {"A": ["x", "y"], "B": []}"""
    mapping = {}
    for item in items:
        name, _, values = item.partition("=")
        mapping[name] = [value for value in values.split(",") if value]
    return mapping


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the fake Lambda Cloud API on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("FAKE_LAMBDA_API_KEY", "test-api-key"))
    parser.add_argument("--boot-seconds", type=float, default=0.5)
    parser.add_argument("--ip", default="127.0.0.1", help="the ip every instance gets once active")
    parser.add_argument("--ssh-port", type=int, help="recorded in the state file (the API has no port)")
    parser.add_argument("--state", help="JSON file rewritten on every change")
    parser.add_argument("--launch-interval", type=float, default=0.0)
    parser.add_argument("--quota", type=int)
    parser.add_argument("--ssh-key", action="append", default=[], help="NAME of an SSH key that exists")
    parser.add_argument("--capacity", action="append", default=[], metavar="TYPE=REGION,REGION",
                        help="regions with capacity for TYPE (others answer insufficient-capacity)")
    parser.add_argument("--image-families", action="append", default=[], metavar="REGION=FAMILY,FAMILY",
                        help="image families REGION offers (default: every family everywhere)")
    args = parser.parse_args(argv)
    api = FakeLambdaAPI(args.api_key, boot_seconds=args.boot_seconds, instance_ip=args.ip,
                        launch_interval=args.launch_interval, capacity=_mapping(args.capacity), quota=args.quota,
                        state_file=args.state, port=args.port, ssh_port=args.ssh_port,
                        image_families=_mapping(args.image_families))
    for name in args.ssh_key:
        api.add_ssh_key(name)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    api.start()
    print(api.url, flush=True)
    stop.wait()
    api.stop()


if __name__ == "__main__":
    main()
