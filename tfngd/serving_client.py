"""A small client for TF Serving's REST predict API (standard library only).

Usage::

    from tfngd import serving_client
    images = serving_client.predict("localhost", "digits", num_samples=16, seed=0, num_steps=50)

The request uses the columnar format (``"inputs"``), the only one that can
carry scalar inputs::

    POST http://host:port/v1/models/<name>[/versions/<v>]:predict
    {"signature_name": "serving_default",
     "inputs": {"num_samples": 16, "seed": 0, "num_steps": 50}}

TF Serving answers ``{"outputs": ...}`` (the bare value when the signature has
one output, as ours does, or ``{"samples": ...}``) or, on failure, an HTTP
error whose body is ``{"error": "..."}``; the latter is raised as
:class:`ServingError` carrying the server's message.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from tfngd.validation import check_integer

SIGNATURE_NAME = "serving_default"
OUTPUT_KEY = "samples"
DEFAULT_PORT = 8501


class ServingError(RuntimeError):
    """A failed predict call: ``status`` is the HTTP status (None if unreachable)."""

    def __init__(self, message: str, status: int | None = None, url: str | None = None):
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.message = message
        self.status = status
        self.url = url


def build_request(num_samples: int, seed: int, num_steps: int, label: int | None = None,
                  guidance_scale: float | None = None,
                  signature_name: str = SIGNATURE_NAME) -> dict:
    """The JSON body of a predict request (columnar format).

    ``label`` without ``guidance_scale`` means pure conditional sampling
    (``guidance_scale = 1``); ``guidance_scale`` needs a ``label``. Range
    checks are the server's (it names the allowed ranges in its error).
    """
    inputs = {
        "num_samples": check_integer("num_samples", num_samples),
        "seed": check_integer("seed", seed),
        "num_steps": check_integer("num_steps", num_steps),
    }
    if label is None:
        if guidance_scale is not None:
            raise ValueError("guidance_scale needs a label (conditional models only)")
    else:
        scale = 1.0 if guidance_scale is None else float(guidance_scale)
        if not math.isfinite(scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        inputs["label"] = check_integer("label", label)
        inputs["guidance_scale"] = scale
    return {"signature_name": signature_name, "inputs": inputs}


def predict_url(host: str, model_name: str, version: int | None = None,
                port: int = DEFAULT_PORT) -> str:
    """``http://host:port/v1/models/<name>[/versions/<v>]:predict``."""
    if not host or "/" in host:
        raise ValueError(f"host must be a host name or address without a scheme, got {host!r}")
    if not model_name:
        raise ValueError("model_name must be non-empty")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    path = f"/v1/models/{urllib.parse.quote(model_name, safe='')}"
    if version is not None:
        path += f"/versions/{check_integer('version', version)}"
    return f"http://{host}:{check_integer('port', port)}{path}:predict"


def decode_outputs(response: dict, output_key: str = OUTPUT_KEY) -> np.ndarray:
    """The samples in a predict response: uint8 for integer data, float32 otherwise."""
    if "error" in response:
        raise ServingError(str(response["error"]))
    if "outputs" not in response:
        raise ServingError(f"response has no 'outputs': keys {sorted(response)}")
    outputs = response["outputs"]
    if isinstance(outputs, dict):
        if output_key not in outputs:
            raise ServingError(f"response has no output {output_key!r}: keys {sorted(outputs)}")
        outputs = outputs[output_key]
    array = np.asarray(outputs)
    if array.dtype.kind in "iu" and (array.size == 0 or (array.min() >= 0 and array.max() <= 255)):
        return array.astype(np.uint8)
    return array.astype(np.float32)


def _error_message(body: bytes) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip() or "(empty response body)"
    if isinstance(parsed, dict) and "error" in parsed:
        return str(parsed["error"])
    return text.strip()


def predict(host: str, model_name: str, num_samples: int, seed: int, num_steps: int,
            label: int | None = None, guidance_scale: float | None = None,
            version: int | None = None, port: int = DEFAULT_PORT,
            timeout: float = 300.0) -> np.ndarray:
    """Ask TF Serving for samples; returns ``[n, H, W, C]`` uint8 or ``[n, D]`` float32.

    The connection goes straight to ``host:port`` (proxy environment
    variables are ignored).

    Raises:
      ServingError: the server answered with an error (its message is kept in
        ``.message``, the HTTP status in ``.status``) or could not be reached.
      ValueError: a malformed argument.
    """
    url = predict_url(host, model_name, version, port)
    body = json.dumps(build_request(num_samples, seed, num_steps, label, guidance_scale))
    request = urllib.request.Request(
        url, data=body.encode("utf-8"), method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
    # Connect directly: a model server is addressed as given, never via *_proxy variables.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as err:
        with err:
            message = _error_message(err.read())
        raise ServingError(message, status=err.code, url=url) from err
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise ServingError(f"cannot reach {url}: {reason}", url=url) from err
    try:
        decoded = json.loads(payload)
    except ValueError as err:
        raise ServingError(f"invalid JSON in the response from {url}", url=url) from err
    if not isinstance(decoded, dict):
        raise ServingError(f"unexpected response from {url}: {type(decoded).__name__}", url=url)
    return decode_outputs(decoded)
