"""SavedModel export of the sampler (TF Serving signature) and the REST client.

Each tiny model is exported once per module. The exports are exercised the
way TF Serving loads them (``saved_model_cli run``, a session-based loader)
and from a fresh Python process that imports only TensorFlow.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tfngd import export, serving_client
from tfngd.gaussian_diffusion import GaussianDiffusion
from tfngd.model import DiffusionModel
from tfngd.networks import build_mlp_denoiser, build_unet

T = 20
MAX_SAMPLES = 16
PY_FUNC_OPS = {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
SUBPROCESS_TIMEOUT = 120


def _randomize(model: DiffusionModel, scale: float, seed: int) -> DiffusionModel:
    """Perturb the EMA weights so the (zero-initialised) output layers do something."""
    rng = np.random.default_rng(seed)
    for weight in model.ema_denoiser.weights:
        value = weight.numpy()
        weight.assign(value + rng.normal(0.0, scale, value.shape).astype(value.dtype))
    return model


@pytest.fixture(scope="module")
def image_model():
    keras.utils.set_random_seed(0)
    unet = build_unet((8, 8, 1), base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), groups=4)
    return _randomize(DiffusionModel(unet, GaussianDiffusion("cosine", T)), 0.05, 0)


@pytest.fixture(scope="module")
def vector_model():
    keras.utils.set_random_seed(1)
    mlp = build_mlp_denoiser(2, hidden_units=16, num_blocks=1)
    return _randomize(DiffusionModel(mlp, GaussianDiffusion("linear", T)), 0.2, 1)


@pytest.fixture(scope="module")
def conditional_model():
    keras.utils.set_random_seed(2)
    mlp = build_mlp_denoiser(2, hidden_units=16, num_blocks=1, num_classes=3)
    model = DiffusionModel(mlp, GaussianDiffusion("linear", T, prediction_type="v"),
                           num_classes=3)
    return _randomize(model, 0.2, 2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, image_model, vector_model, conditional_model):
    root = tmp_path_factory.mktemp("saved_models")
    return {
        "image": export.export_sampler(image_model, str(root / "image" / "1"),
                                       max_samples=MAX_SAMPLES),
        "vector": export.export_sampler(vector_model, str(root / "vector" / "1"),
                                        sampler="ddpm"),
        "conditional": export.export_sampler(conditional_model, str(root / "cond" / "1"),
                                             max_steps=10),
    }


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _saved_model_cli(export_dir: str, input_exprs: str, outdir) -> subprocess.CompletedProcess:
    import shutil

    cli = shutil.which("saved_model_cli")
    if cli is None:
        pytest.skip("saved_model_cli is not installed")
    return subprocess.run(
        [cli, "run", "--dir", export_dir, "--tag_set", "serve", "--signature_def",
         export.SIGNATURE_NAME, "--input_exprs", input_exprs, "--outdir", str(outdir),
         "--overwrite"],
        capture_output=True, text=True, env=_env(), timeout=SUBPROCESS_TIMEOUT,
    )


def _to_uint8(x) -> np.ndarray:
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _saved_model_proto(export_dir: str) -> saved_model_pb2.SavedModel:
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto


# -- saved_model_cli (the session-based loader TF Serving uses) -----------------------

def test_saved_model_cli_run_is_deterministic(exports, tmp_path):
    outputs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = _saved_model_cli(exports["image"], f"num_samples=3;seed={seed};num_steps=4",
                                  tmp_path / name)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[name] = np.load(tmp_path / name / f"{export.OUTPUT_KEY}.npy")
    samples = outputs["a"]
    assert samples.shape == (3, 8, 8, 1) and samples.dtype == np.uint8
    assert 0 <= samples.min() and samples.max() <= 255 and samples.std() > 0
    np.testing.assert_array_equal(outputs["a"], outputs["b"])
    assert np.any(outputs["a"] != outputs["c"])


@pytest.mark.parametrize("name, exprs, message", [
    ("image", "num_samples=100000;seed=7;num_steps=4",
     f"num_samples must be in [1, {MAX_SAMPLES}]"),
    # 2**31 - 1 images would need 512 GiB: the range check runs before any allocation.
    ("image", "num_samples=2147483647;seed=7;num_steps=4",
     f"num_samples must be in [1, {MAX_SAMPLES}]"),
    ("image", "num_samples=-3;seed=7;num_steps=4", f"num_samples must be in [1, {MAX_SAMPLES}]"),
    ("image", "num_samples=2;seed=7;num_steps=0", f"num_steps must be in [1, {T}]"),
    ("image", "num_samples=2;seed=7;num_steps=-1", f"num_steps must be in [1, {T}]"),
    ("conditional", "num_samples=2;seed=7;num_steps=4;label=3;guidance_scale=1.0",
     "label must be in [0, 2]"),
    ("conditional", "num_samples=2;seed=7;num_steps=4;label=1;guidance_scale=-1.0",
     "guidance_scale must be finite and >= 0"),
])
def test_saved_model_cli_rejects_bad_requests(exports, tmp_path, name, exprs, message):
    result = _saved_model_cli(exports[name], exprs, tmp_path / "out")
    assert result.returncode != 0
    assert "InvalidArgumentError" in result.stderr and message in result.stderr, \
        result.stderr[-3000:]
    assert not (tmp_path / "out" / f"{export.OUTPUT_KEY}.npy").exists()


# -- a fresh process that imports only TensorFlow -----------------------------------

FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    image, vector, conditional, out = sys.argv[1:5]
    fns = {name: tf.saved_model.load(path).signatures["serving_default"]
           for name, path in (("image", image), ("vector", vector), ("conditional", conditional))}

    def call(name, n, seed, steps, **extra):
        inputs = dict(num_samples=tf.constant(n, tf.int32), seed=tf.constant(seed, tf.int64),
                      num_steps=tf.constant(steps, tf.int32))
        if "label" in extra:
            inputs["label"] = tf.constant(extra["label"], tf.int32)
            inputs["guidance_scale"] = tf.constant(extra["guidance_scale"], tf.float32)
        return fns[name](**inputs)["samples"].numpy()

    arrays = {
        "image": call("image", 3, 7, 4),
        "vector": call("vector", 5, 3, 20),
        "guided": call("conditional", 4, 5, 6, label=1, guidance_scale=2.0),
        "plain": call("conditional", 4, 5, 6, label=2, guidance_scale=1.0),
    }
    bad = {
        "steps_too_many": ("image", 2, 0, 21, {}),
        "no_samples": ("image", 0, 0, 4, {}),
        "steps_over_max": ("conditional", 2, 0, 11, dict(label=0, guidance_scale=1.0)),
        "label_high": ("conditional", 2, 0, 4, dict(label=3, guidance_scale=1.0)),
        "label_negative": ("conditional", 2, 0, 4, dict(label=-1, guidance_scale=1.0)),
        "scale_negative": ("conditional", 2, 0, 4, dict(label=0, guidance_scale=-0.5)),
        "scale_nan": ("conditional", 2, 0, 4, dict(label=0, guidance_scale=float("nan"))),
    }
    errors = {}
    for key, (name, n, seed, steps, extra) in bad.items():
        try:
            call(name, n, seed, steps, **extra)
            errors[key] = None
        except tf.errors.InvalidArgumentError as err:
            errors[key] = err.message
    info = {
        "errors": errors,
        "inputs": {name: sorted(fn.structured_input_signature[1]) for name, fn in fns.items()},
        "imported_tfngd": any(m.startswith("tfngd") for m in sys.modules),
    }
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(info, f)
""")


@pytest.fixture(scope="module")
def fresh_process(exports, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fresh")
    script = workdir / "load.py"
    script.write_text(FRESH_PROCESS)
    out = str(workdir / "result")
    result = subprocess.run(
        [sys.executable, str(script), exports["image"], exports["vector"],
         exports["conditional"], out],
        capture_output=True, text=True, env=_env(), cwd=workdir, timeout=SUBPROCESS_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out + ".json") as f:
        info = json.load(f)
    return dict(np.load(out + ".npz")), info


def test_fresh_process_matches_in_process_sampling(fresh_process, image_model, vector_model,
                                                   conditional_model):
    arrays, info = fresh_process
    assert not info["imported_tfngd"]

    image = arrays["image"]
    assert image.shape == (3, 8, 8, 1) and image.dtype == np.uint8
    expected = _to_uint8(image_model.sample(3, seed=7, num_steps=4))
    difference = np.abs(image.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.05
    assert len(np.unique(image)) > 2  # not just saturated noise

    vector = arrays["vector"]
    assert vector.shape == (5, 2) and vector.dtype == np.float32
    # The untrained vector model's ancestral samples reach |x| ~ 1e5 (no clipping for
    # vectors), where float32 rounding alone is ~1e-2: compare relative to the magnitude.
    np.testing.assert_allclose(
        vector, vector_model.sample(5, seed=3, num_steps=20, sampler="ddpm"), rtol=1e-4,
        atol=1e-4)

    guided = conditional_model.sample(4, seed=5, num_steps=6, label=1, guidance_scale=2.0)
    np.testing.assert_allclose(arrays["guided"], guided, atol=1e-4)
    plain = conditional_model.sample(4, seed=5, num_steps=6, label=2)
    np.testing.assert_allclose(arrays["plain"], plain, atol=1e-4)
    assert not np.allclose(arrays["guided"], arrays["plain"])


def test_fresh_process_rejects_bad_requests(fresh_process):
    _, info = fresh_process
    errors = info["errors"]
    expected = {
        "steps_too_many": f"num_steps must be in [1, {T}]",
        "no_samples": f"num_samples must be in [1, {MAX_SAMPLES}]",
        "steps_over_max": "num_steps must be in [1, 10]",
        "label_high": "label must be in [0, 2]",
        "label_negative": "label must be in [0, 2]",
        "scale_negative": "guidance_scale must be finite and >= 0",
        "scale_nan": "guidance_scale must be finite and >= 0",
    }
    for key, message in expected.items():
        assert errors[key] is not None and message in errors[key], (key, errors[key])


def test_signatures(exports, fresh_process):
    _, info = fresh_process
    assert info["inputs"]["image"] == ["num_samples", "num_steps", "seed"]
    assert info["inputs"]["conditional"] == [
        "guidance_scale", "label", "num_samples", "num_steps", "seed"]
    expected = {
        "image": (tf.uint8, [-1, 8, 8, 1]),
        "vector": (tf.float32, [-1, 2]),
        "conditional": (tf.float32, [-1, 2]),
    }
    input_dtypes = {"num_samples": tf.int32, "seed": tf.int64, "num_steps": tf.int32,
                    "label": tf.int32, "guidance_scale": tf.float32}
    for name, (dtype, shape) in expected.items():
        (meta_graph,) = _saved_model_proto(exports[name]).meta_graphs
        assert "serve" in meta_graph.meta_info_def.tags
        signature = meta_graph.signature_def[export.SIGNATURE_NAME]
        for key, tensor in signature.inputs.items():
            assert tensor.dtype == input_dtypes[key].as_datatype_enum
            assert tensor.tensor_shape.dim == [] and not tensor.tensor_shape.unknown_rank
        (output,) = signature.outputs.items()
        assert output[0] == export.OUTPUT_KEY
        assert output[1].dtype == dtype.as_datatype_enum
        assert [d.size for d in output[1].tensor_shape.dim] == shape


def test_graph_has_no_python_ops(exports):
    for export_dir in exports.values():
        ops = set()
        for meta_graph in _saved_model_proto(export_dir).meta_graphs:
            ops |= {node.op for node in meta_graph.graph_def.node}
            for function in meta_graph.graph_def.library.function:
                ops |= {node.op for node in function.node_def}
        assert "StatelessRandomNormalV2" in ops  # the function library was searched
        assert not ops & PY_FUNC_OPS, ops & PY_FUNC_OPS


def test_metadata(exports, image_model):
    meta = export.read_export_metadata(exports["image"])
    assert meta["data_shape"] == [8, 8, 1] and meta["is_image"]
    assert meta["limits"] == {"max_samples": MAX_SAMPLES, "max_steps": T, "label": None}
    assert meta["sampler"] == {"name": "ddim", "eta": 0.0, "spacing": "trailing",
                               "clip_x0": True}
    assert meta["diffusion"] == image_model.diffusion.get_config()
    assert meta["output"]["dtype"] == "uint8"
    cond = export.read_export_metadata(exports["conditional"])
    assert cond["num_classes"] == 3 and cond["limits"]["label"] == [0, 2]
    assert cond["limits"]["max_steps"] == 10 and cond["output"]["dtype"] == "float32"
    assert not any(name.startswith(".") for name in os.listdir(os.path.dirname(
        exports["image"])))  # no staging directory left behind


# -- Python-side argument checks (no export written) --------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="euler"), "valid samplers: ddpm, ddim"),
    (dict(spacing="cubic"), "valid spacings"),
    (dict(max_samples=0), "max_samples must be an integer >= 1"),
    (dict(max_steps=0), f"max_steps must be an integer in [1, {T}]"),
    (dict(max_steps=T + 1), f"max_steps must be an integer in [1, {T}]"),
    (dict(eta=-1.0), "eta must be"),
    (dict(output="png"), "valid outputs"),
])
def test_bad_export_arguments(vector_model, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        export.export_sampler(vector_model, str(tmp_path / "m" / "1"), **kwargs)
    assert not (tmp_path / "m" / "1").exists()


def test_weights_that_are_not_finite_are_not_exported(tmp_path):
    keras.utils.set_random_seed(3)
    model = DiffusionModel(build_mlp_denoiser(2, hidden_units=8, num_blocks=1),
                           GaussianDiffusion("linear", T))
    weight = model.ema_denoiser.weights[0]
    value = weight.numpy()
    value.flat[1] = np.nan
    weight.assign(value)
    with pytest.raises(ValueError, match=r"1 non-finite value.*" + weight.path):
        export.export_sampler(model, str(tmp_path / "m" / "1"))
    assert not (tmp_path / "m").exists()


def test_uint8_output_needs_an_image_model(vector_model, tmp_path):
    with pytest.raises(ValueError, match="image model"):
        export.export_sampler(vector_model, str(tmp_path / "1"), output="uint8")


def test_existing_export_is_not_overwritten(exports, vector_model):
    with pytest.raises(FileExistsError):
        export.export_sampler(vector_model, exports["image"])


# -- REST client against a stub server on 127.0.0.1 ---------------------------------

CANNED = {
    "/v1/models/digits:predict": (200, {"outputs": [[[[0], [255]]], [[[12], [3]]]]}),
    "/v1/models/moons/versions/3:predict": (200, {"outputs": {"samples": [[0.5, -1.25]]}}),
    "/v1/models/bad:predict": (400, {"error": "assertion failed: [num_samples must be in "
                                              "[1, 64], got] [100000]"}),
}


class _StubHandler(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        length = int(self.headers.get("Content-Length", 0))
        self.requests.append((self.path, json.loads(self.rfile.read(length))))
        status, payload = CANNED.get(self.path, (404, {"error": "Servable not found"}))
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    _StubHandler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _StubHandler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_build_request():
    assert serving_client.build_request(3, 7, 4) == {
        "signature_name": "serving_default",
        "inputs": {"num_samples": 3, "seed": 7, "num_steps": 4},
    }
    body = serving_client.build_request(2, 0, 10, label=1, guidance_scale=3)
    assert body["inputs"] == {"num_samples": 2, "seed": 0, "num_steps": 10, "label": 1,
                              "guidance_scale": 3.0}
    assert serving_client.build_request(2, 0, 10, label=np.int64(2))["inputs"][
        "guidance_scale"] == 1.0
    json.dumps(body)  # serialisable
    with pytest.raises(ValueError, match="needs a label"):
        serving_client.build_request(2, 0, 10, guidance_scale=2.0)
    with pytest.raises(ValueError, match="num_samples must be an integer"):
        serving_client.build_request(2.5, 0, 10)
    assert serving_client.predict_url("localhost", "digits") == \
        "http://localhost:8501/v1/models/digits:predict"
    assert serving_client.predict_url("::1", "digits", version=2, port=9000) == \
        "http://[::1]:9000/v1/models/digits/versions/2:predict"


def test_predict_against_stub_server(stub_server):
    port, requests = stub_server
    images = serving_client.predict("127.0.0.1", "digits", num_samples=2, seed=7, num_steps=4,
                                    port=port, timeout=10)
    assert images.dtype == np.uint8 and images.shape == (2, 1, 2, 1)
    assert images[0, 0, 1, 0] == 255
    assert requests[-1] == ("/v1/models/digits:predict", serving_client.build_request(2, 7, 4))

    points = serving_client.predict("127.0.0.1", "moons", 1, 0, 5, label=1, guidance_scale=2.0,
                                    version=3, port=port, timeout=10)
    assert points.dtype == np.float32
    np.testing.assert_array_equal(points, [[0.5, -1.25]])
    assert requests[-1][1]["inputs"]["label"] == 1


def test_predict_raises_the_server_error(stub_server):
    port, _ = stub_server
    with pytest.raises(serving_client.ServingError, match="num_samples must be in") as info:
        serving_client.predict("127.0.0.1", "bad", 100000, 0, 4, port=port, timeout=10)
    assert info.value.status == 400
    assert info.value.message.startswith("assertion failed")
    with pytest.raises(serving_client.ServingError, match="Servable not found"):
        serving_client.predict("127.0.0.1", "missing", 1, 0, 4, port=port, timeout=10)


def test_predict_unreachable_server():
    with socket.socket() as sock:  # a port on 127.0.0.1 that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(serving_client.ServingError, match="cannot reach") as info:
        serving_client.predict("127.0.0.1", "digits", 1, 0, 4, port=port, timeout=5)
    assert info.value.status is None
