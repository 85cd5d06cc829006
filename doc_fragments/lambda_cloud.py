"""Options every Lambda Cloud module shares (the API key and endpoint), documented once."""


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  api_key:
    description:
      - Lambda Cloud API key, created in the Lambda Cloud dashboard under API keys.
      - Read from the E(LAMBDA_API_KEY) environment variable when not given. Prefer the
        environment, as a key in module arguments can end up in logs unless the task has C(no_log).
    type: str
  api_url:
    description:
      - Base URL of the Lambda Cloud API v1.
      - Read from the E(LAMBDA_API_URL) environment variable when not given, then defaults to
        U(https://cloud.lambda.ai/api/v1).
    type: str
notes:
  - Requests that answer 429, 5xx or time out are retried with exponential backoff (E(LAMBDA_API_BACKOFF)
    seconds to start, 1 by default); an invalid key fails at once. Launches are spaced at least
    E(LAMBDA_LAUNCH_INTERVAL) seconds apart (12 by default), as Lambda Cloud allows about 5 per minute.
requirements:
  - requests
"""
