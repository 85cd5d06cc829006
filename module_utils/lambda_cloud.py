"""The one Lambda Cloud API client: used by the Ansible modules, the inventory plugin and `lt`.

Pure Python + requests, no Ansible imports: the inventory plugin and the CLI load this file by path.
Every method returns the reply's ``data`` exactly as the API gives it; every failure is a
``LambdaCloudError`` subclass whose text says what failed and what to do about it. The API key is
sent as a Bearer token and nowhere else: not in ``repr()``, exception text or log records.
"""

from __future__ import annotations

import email.utils
import functools
import logging
import os
import random
import time

import requests

DEFAULT_BASE_URL = "https://cloud.lambda.ai/api/v1"
API_URL_ENV = "LAMBDA_API_URL"
API_KEY_ENV = "LAMBDA_API_KEY"
# Seconds; tests and impatient users turn these down without touching code.
BACKOFF_ENV = "LAMBDA_API_BACKOFF"
LAUNCH_INTERVAL_ENV = "LAMBDA_LAUNCH_INTERVAL"
USER_AGENT = "llama-trainer/0.1"
# The image instances boot unless told otherwise: Lambda Stack on Ubuntu 24.04 (Python 3.12). The
# API's own default, Ubuntu 22.04, has Python 3.10, on which the pinned training stack (trl 1.15)
# does not install.
DEFAULT_IMAGE_FAMILY = "lambda-stack-24-04"

# A Retry-After longer than this is treated as this: a module run should not hang for an hour.
MAX_RETRY_DELAY = 120.0

log = logging.getLogger("llama_trainer.lambda_cloud")


class LambdaCloudError(Exception):
    """A failed Lambda Cloud call. ``str()`` is a message a person can act on."""

    code: str | None = None
    advice = "Check the request, then retry."

    def __init__(self, message, *, code=None, suggestion=None, status=None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.suggestion = suggestion or self.advice
        self.status = status

    def __str__(self):
        details = []
        if self.code:
            details.append(self.code)
        if self.status:
            details.append(f"HTTP {self.status}")
        text = self.message.rstrip(".")
        if details:
            text += f" ({', '.join(details)})"
        return f"{text}. What to do: {self.suggestion}"


class InvalidApiKey(LambdaCloudError):
    code = "global/invalid-api-key"
    advice = (
        "Check the Lambda Cloud API key (LAMBDA_API_KEY or lambda-cloud-api-key in config/trainer.json); "
        "if it was deleted or expired, generate a new one in the Lambda Cloud dashboard under API keys."
    )


class AccountInactive(LambdaCloudError):
    code = "global/account-inactive"
    advice = "The Lambda Cloud account is not active: check billing and account status in the dashboard."


class InsufficientCapacity(LambdaCloudError):
    code = "instance-operations/launch/insufficient-capacity"
    advice = (
        "Add more regions or instance types in order of preference (`lt types` lists what has "
        "capacity now), or retry later."
    )


class QuotaExceeded(LambdaCloudError):
    code = "global/quota-exceeded"
    advice = (
        "Terminate instances you no longer need (`lt status`, `lt down --all`) or ask Lambda support "
        "to raise the account's quota."
    )


class InvalidParameters(LambdaCloudError):
    code = "global/invalid-parameters"
    advice = "Check the instance type, region, SSH key name, instance name and image in the configuration."


class ObjectDoesNotExist(LambdaCloudError):
    code = "global/object-does-not-exist"
    advice = "Check the id or name: `lt status` lists instances, the dashboard lists SSH keys and file systems."


class FileSystemInWrongRegion(LambdaCloudError):
    code = "instance-operations/launch/file-system-in-wrong-region"
    advice = "Launch in the region where the file system lives, or leave the file system out."


class RateLimited(LambdaCloudError):
    code = "rate-limited"
    advice = "Wait a minute and retry: Lambda Cloud allows about 1 request per second and 1 launch per 12 s."


class ServerError(LambdaCloudError):
    code = "server-error"
    advice = "The Lambda Cloud API is failing or unreachable: check the network and api_url, then retry later."


class InstanceNotReady(LambdaCloudError):
    """Waiting for an instance ended without it becoming active with an IP address."""

    code = "instance-not-ready"
    advice = "Terminate the instance if it is still running (`lt down`), then launch again."

    def __init__(self, message, *, instance_id=None, last_status=None, **kwargs):
        super().__init__(message, **kwargs)
        self.instance_id = instance_id
        self.last_status = last_status


_ERROR_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidApiKey,
        AccountInactive,
        InsufficientCapacity,
        QuotaExceeded,
        InvalidParameters,
        ObjectDoesNotExist,
        FileSystemInWrongRegion,
    )
}
_ERROR_BY_CODE["global/internal-error"] = ServerError
_ERROR_BY_CODE["global/unknown"] = ServerError

# Statuses of an instance that still exists (and may bill).
LIVE_STATUSES = frozenset({"booting", "active", "unhealthy"})


class LambdaCloudClient:
    """A Lambda Cloud API v1 client with retries, backoff and a launch rate limit.

    ``api_key``, ``base_url``, ``backoff`` and ``launch_interval`` fall back to LAMBDA_API_KEY,
    LAMBDA_API_URL, LAMBDA_API_BACKOFF and LAMBDA_LAUNCH_INTERVAL, then to the defaults (the public
    API, 1 s, 12 s). Retries cover 429, 5xx, timeouts and connection errors (``max_retries`` more
    tries, exponential backoff from ``backoff`` seconds with jitter, Retry-After honoured); every
    other error, an invalid key first of all, is raised at once.
    """

    def __init__(
        self,
        api_key=None,
        base_url=None,
        timeout=30,
        max_retries=5,
        backoff=None,
        launch_interval=None,
        user_agent=USER_AGENT,
    ):
        api_key = api_key or os.environ.get(API_KEY_ENV)
        if not api_key:
            raise InvalidApiKey(
                "No Lambda Cloud API key was given",
                suggestion="Set LAMBDA_API_KEY or lambda-cloud-api-key in config/trainer.json.",
            )
        self._api_key = _Secret(api_key)
        self.base_url = (base_url or os.environ.get(API_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = _setting(backoff, BACKOFF_ENV, 1.0)
        self.launch_interval = _setting(launch_interval, LAUNCH_INTERVAL_ENV, 12.0)
        self._last_launch = None
        self._session = requests.Session()
        self._session.headers.update(
            {"Authorization": f"Bearer {api_key}", "User-Agent": user_agent, "Accept": "application/json"}
        )

    def __repr__(self):
        return f"LambdaCloudClient(base_url={self.base_url!r})"

    # -- endpoints ---------------------------------------------------------------------------

    def instance_types(self):
        return self._request("GET", "/instance-types")

    def launch(
        self,
        *,
        region_name,
        instance_type_name,
        ssh_key_names,
        name=None,
        file_system_names=None,
        image=None,
        user_data=None,
        tags=None,
    ):
        """Launch one instance; returns its ids (a list of one)."""
        body = {
            "region_name": region_name,
            "instance_type_name": instance_type_name,
            "ssh_key_names": list(ssh_key_names),
        }
        optional = {
            "name": name,
            "file_system_names": file_system_names,
            "image": image,
            "user_data": user_data,
            "tags": tags,
        }
        body.update({key: value for key, value in optional.items() if value})
        reconcile = None
        if name:
            # A launch whose answer is lost (timeout, 5xx) may still have created an instance; a retry
            # would then pay for two. Before retrying, look for a new instance with this name.
            before = {instance["id"] for instance in self.find_instances_by_name(name)}
            reconcile = functools.partial(self._adopt_new_instances, name, before)
        self._respect_launch_interval()
        try:
            data = self._request("POST", "/instance-operations/launch", body, reconcile=reconcile)
        except ServerError as exc:
            what = f"An instance named {name!r}" if name else "An instance"
            exc.suggestion += (
                f" {what} may have been created anyway: check `lt status` or the Lambda Cloud dashboard "
                "and terminate it if it is there."
            )
            raise
        finally:
            self._last_launch = time.monotonic()
        return list(data["instance_ids"])

    def list_instances(self):
        return self._request("GET", "/instances")

    def get_instance(self, instance_id):
        return self._request("GET", f"/instances/{instance_id}")

    def terminate(self, instance_ids):
        data = self._request("POST", "/instance-operations/terminate", {"instance_ids": list(instance_ids)})
        return data["terminated_instances"]

    def restart(self, instance_ids):
        data = self._request("POST", "/instance-operations/restart", {"instance_ids": list(instance_ids)})
        return data["restarted_instances"]

    def list_ssh_keys(self):
        return self._request("GET", "/ssh-keys")

    def add_ssh_key(self, name, public_key=None):
        """Register a key; without ``public_key`` the API generates a pair and returns ``private_key`` once."""
        body = {"name": name}
        if public_key:
            body["public_key"] = public_key
        return self._request("POST", "/ssh-keys", body)

    def delete_ssh_key(self, key_id):
        self._request("DELETE", f"/ssh-keys/{key_id}")

    def list_images(self):
        return self._request("GET", "/images")

    def list_file_systems(self):
        return self._request("GET", "/file-systems")

    # -- helpers -----------------------------------------------------------------------------

    def find_instances_by_name(self, name):
        """Instances called ``name`` that are not terminated."""
        return [i for i in self.list_instances() if i.get("name") == name and i.get("status") != "terminated"]

    def wait_for_instance(self, instance_id, timeout, interval=5):
        """Poll until the instance is active and has an IP address; returns the Instance.

        Polls start half a second apart and grow to ``interval``: a restart can be quick, a boot
        takes minutes.
        """
        deadline = time.monotonic() + timeout
        pause = min(0.5, interval)
        while True:
            instance = self.get_instance(instance_id)
            status = instance.get("status")
            if status == "active" and instance.get("ip"):
                return instance
            if status not in LIVE_STATUSES:
                raise InstanceNotReady(
                    f"Instance {instance_id} became {status!r} while waiting for it to become active",
                    instance_id=instance_id,
                    last_status=status,
                    suggestion="Launch again; if it keeps happening, try another region or instance type.",
                )
            if time.monotonic() + pause > deadline:
                raise InstanceNotReady(
                    f"Instance {instance_id} was not active with an IP address after {timeout:g} s "
                    f"(last status {status!r})",
                    instance_id=instance_id,
                    last_status=status,
                    suggestion=(
                        f"It may still be billing: end it with `lt down` (instance id {instance_id}), "
                        "then launch again with a longer wait timeout."
                    ),
                )
            time.sleep(pause)
            pause = min(pause * 2, interval)

    def regions_with_image(self, image, regions=()):
        """Regions (of all, not only ``regions``) whose image list offers ``image`` (``{"family"}`` or
        ``{"id"}``), from one GET /images.

        Raises ``InvalidParameters`` naming what each region offers when none of ``regions`` (any
        region when empty) has it, so that no launch is paid for or refused over it.
        """
        key, wanted = next(iter(image.items()))
        images = self.list_images()
        offered = {}  # region -> names a person can pick from there
        having = set()
        for entry in images:
            region = _region_name(entry.get("region"))
            label = entry.get("family") if key == "family" else f"{entry.get('id')} ({entry.get('family')})"
            offered.setdefault(region, set()).add(label)
            if entry.get(key) == wanted:
                having.add(region)
        if None in having:
            return _Everywhere()
        if any(region in having for region in list(regions) or offered):
            return having
        what = f"Image {_describe(image)}"
        where = " or ".join(regions) if regions else "any region"
        raise InvalidParameters(
            f"{what} is not offered in {where}; nothing was launched",
            suggestion=(
                f"Choose an image {key} offered there (image-family in config/trainer.json) or a region "
                f"that offers it. What each region offers: {_offers_by_region(offered, regions)}."
                + (f" {what} is offered in {', '.join(sorted(having))}." if having else "")
            ),
        )

    def launch_with_failover(self, *, instance_types, regions, **launch_kwargs):
        """Launch the first (type, region) in order of preference that has capacity.

        Regions not listed in ``regions_with_capacity_available`` are skipped without a launch
        request (launches are rate limited); an empty ``regions`` means any region with capacity.
        With an ``image``, regions whose image list lacks it are skipped too, and when none of the
        regions offers it nothing is launched (``InvalidParameters`` names what they offer).
        Returns ``(instance_ids, instance_type_name, region_name)``.
        """
        catalogue = self.instance_types()
        unknown = [name for name in instance_types if name not in catalogue]
        if unknown:
            raise InvalidParameters(
                f"Unknown instance type(s) {', '.join(unknown)}",
                suggestion=f"Use one of: {', '.join(sorted(catalogue))}.",
            )
        image = launch_kwargs.get("image")
        with_image = self.regions_with_image(image, regions) if image else _Everywhere()
        tried = []
        for type_name in instance_types:
            listed = [r["name"] for r in catalogue[type_name].get("regions_with_capacity_available", [])]
            for region in regions or listed:
                if region not in with_image:
                    tried.append(f"{type_name} in {region}: image {_describe(image)} not offered there")
                    continue
                if region not in listed:
                    tried.append(f"{type_name} in {region}: no capacity listed")
                    continue
                try:
                    ids = self.launch(region_name=region, instance_type_name=type_name, **launch_kwargs)
                except InsufficientCapacity:
                    tried.append(f"{type_name} in {region}: insufficient capacity at launch")
                    continue
                return ids, type_name, region
            if not regions and not listed:
                tried.append(f"{type_name}: no capacity listed in any region")
        raise InsufficientCapacity(
            "No capacity for any instance type and region asked for (" + "; ".join(tried) + ")"
        )

    # -- transport ---------------------------------------------------------------------------

    def _respect_launch_interval(self):
        if self._last_launch is None:
            return
        wait = self.launch_interval - (time.monotonic() - self._last_launch)
        if wait > 0:
            log.info("waiting %.1f s between launches (Lambda allows about one per 12 s)", wait)
            time.sleep(wait)

    def _adopt_new_instances(self, name, before):
        try:
            new = [i["id"] for i in self.find_instances_by_name(name) if i["id"] not in before]
        except LambdaCloudError as exc:
            log.warning("could not check whether the launch created an instance: %s", exc)
            return None
        return {"instance_ids": new} if new else None

    def _request(self, method, path, body=None, *, reconcile=None):
        """One API call with retries; returns ``data``. ``reconcile`` runs after an answer was lost
        and may return the data that the lost answer would have carried."""
        url = self.base_url + path
        attempt = 0
        while True:
            retry_after = None
            try:
                response = self._session.request(method, url, json=body, timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as exc:
                failure = ServerError(
                    self._scrub(f"No answer from the Lambda Cloud API at {url} ({type(exc).__name__})")
                )
            else:
                log.debug("%s %s -> %s", method, path, response.status_code)
                if response.status_code < 400:
                    return _json(response).get("data")
                failure = self._error(response, method, path)
                if not isinstance(failure, RateLimited | ServerError):
                    raise failure
                retry_after = _retry_after(response)
            if reconcile is not None and not isinstance(failure, RateLimited):
                found = reconcile()
                if found is not None:
                    return found
            if attempt >= self.max_retries:
                failure.message += f" (gave up after {attempt + 1} attempts)"
                raise failure
            delay = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
            if retry_after is not None:
                delay = max(delay, retry_after)
            delay = min(delay, MAX_RETRY_DELAY)
            log.warning("%s %s failed (%s); retry %d in %.1f s", method, path, failure.message, attempt + 1, delay)
            time.sleep(delay)
            attempt += 1

    def _error(self, response, method, path):
        payload = _json(response)
        error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
        code = error.get("code")
        status = response.status_code
        if status == 429:
            cls = RateLimited
        elif status >= 500:
            cls = ServerError
        else:
            cls = _ERROR_BY_CODE.get(code)
        if cls is None:
            cls = {401: InvalidApiKey, 403: AccountInactive, 404: ObjectDoesNotExist}.get(status, LambdaCloudError)
        reason = error.get("message") or response.reason or "no details given"
        suggestion = error.get("suggestion")
        return cls(
            self._scrub(f"Lambda Cloud API {method} {path} failed: {reason}"),
            code=code,
            suggestion=self._scrub(suggestion) if suggestion else None,
            status=status,
        )

    def _scrub(self, text):
        return text.replace(self._api_key.reveal(), "***")


class _Everywhere:
    """Membership that holds for every region: no image asked for, or an image listed without one."""

    def __contains__(self, region):
        return True


def _describe(image):
    """{"family": "x"} -> "family 'x'"."""
    key, value = next(iter(image.items()))
    return f"{key} {value!r}"


def _region_name(region):
    """An image's region as a name; None when the listing gives none (offered everywhere)."""
    if isinstance(region, dict):
        return region.get("name")
    return region or None


def _offers_by_region(offered, regions):
    """'us-east-1, us-west-1: a, b; us-west-3: a', grouping regions that offer the same names."""
    asked = list(regions) or sorted(region for region in offered if region)
    groups = {}
    for region in asked:
        names = ", ".join(sorted(offered.get(region, ()))) or "no images"
        groups.setdefault(names, []).append(region)
    return "; ".join(f"{', '.join(where)}: {names}" for names, where in groups.items())


class _Secret:
    """Holds the key so that printing the client's attributes cannot show it."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    def __repr__(self):
        return "'***'"

    __str__ = __repr__


def _setting(value, env_name, default):
    if value is not None:
        return float(value)
    from_env = os.environ.get(env_name)
    return float(from_env) if from_env else default


def _json(response):
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _retry_after(response):
    """Seconds from a Retry-After header (a number or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
