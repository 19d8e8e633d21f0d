"""Real OpenVINO models built with the opset API, for tests and benchmarks (nothing is downloaded)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops


def _save(model: ov.Model, folder: Path, stem: str = "model") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / f"{stem}.xml"
    ov.save_model(model, xml, compress_to_fp16=False)
    return xml


def add_const(
    folder: Path,
    delta: float = 1.0,
    shape: tuple[int, ...] | list[int] = (1, 10),
    dtype: type = np.float32,
    input_name: str = "b",
    output_name: str = "a",
    addend: np.ndarray | None = None,
) -> Path:
    """OVMS's "dummy": output `a` = input `b` + delta (or + `addend`), as IR (model.xml + model.bin) in `folder`."""
    param = ops.parameter(ov.PartialShape(list(shape)), dtype, name=input_name)
    if addend is None:
        addend = np.full([1] * max(len(shape), 1) if shape else [], delta, dtype=dtype)
    const = ops.constant(addend.astype(dtype))
    out = ops.add(param, const)
    out.output(0).get_tensor().set_names({output_name})
    return _save(ov.Model([out], [param], "dummy"), folder)


def const_config(root: Path, name: str = "tiny") -> Path:
    """`root/name/1` an add_const model and `root/models.json` serving it alone: the config file's path."""
    add_const(root / name / "1")
    config = root / "models.json"
    config.write_text(json.dumps({"model_config_list": [{"config": {"name": name, "base_path": str(root / name)}}]}))
    return config


def two_inputs(folder: Path, shape: tuple[int, ...] = (1, 4)) -> Path:
    """`sum` = x + y and `diff` = x - y (FP32): for input-count, name and output-filter tests."""
    x = ops.parameter(list(shape), np.float32, name="x")
    y = ops.parameter(list(shape), np.float32, name="y")
    s = ops.add(x, y)
    s.output(0).get_tensor().set_names({"sum"})
    d = ops.subtract(x, y)
    d.output(0).get_tensor().set_names({"diff"})
    return _save(ov.Model([s, d], [x, y], "two"), folder)


def conv(folder: Path, layers: int = 20, seed: int = 0) -> Path:
    """A ~17 GFLOP conv net on 1x3x224x224 (3x3 convs + bias + ReLU, reduce_mean): the benchmarks' heavy model."""
    rng = np.random.default_rng(seed)
    param = ops.parameter([1, 3, 224, 224], np.float32, name="input")
    node = param
    plan = [(3, 64, 2)] + [(64, 64, 1)] * 9 + [(64, 128, 2)] + [(128, 128, 1)] * 9
    for cin, cout, stride in plan[:layers]:
        w = (rng.standard_normal((cout, cin, 3, 3)) * (2.0 / (cin * 9)) ** 0.5).astype(np.float32)
        node = ops.convolution(node, ops.constant(w), [stride, stride], [1, 1], [1, 1], [1, 1])
        node = ops.relu(ops.add(node, ops.constant(np.zeros((1, cout, 1, 1), np.float32))))
    out = ops.reduce_mean(node, ops.constant(np.array([2, 3], np.int64)), keep_dims=False)
    out.output(0).get_tensor().set_names({"output"})
    return _save(ov.Model([out], [param], "conv"), folder)


def mlp(folder: Path, widths: tuple[int, ...] = (2048, 4096, 2048, 2048, 2048), seed: int = 0) -> Path:
    """An MLP of MatMul + ReLU; the default widths give ~100 MB of FP32 weights."""
    rng = np.random.default_rng(seed)
    param = ops.parameter([1, widths[0]], np.float32, name="input")
    node = param
    for cin, cout in itertools.pairwise(widths):
        w = (rng.standard_normal((cin, cout)) * (1.0 / cin) ** 0.5).astype(np.float32)
        node = ops.relu(ops.matmul(node, ops.constant(w), False, False))
    node.output(0).get_tensor().set_names({"output"})
    return _save(ov.Model([node], [param], "mlp"), folder)


def onnx_add_const(folder: Path, delta: float = 1.0, shape: tuple[int, ...] = (1, 10)) -> Path:
    """The same "dummy" (a = b + delta) as an ONNX file, built with the onnx package."""
    import onnx
    from onnx import TensorProto, helper

    const = helper.make_tensor("delta", TensorProto.FLOAT, [1], [delta])
    graph = helper.make_graph(
        [helper.make_node("Add", ["b", "delta"], ["a"])],
        "dummy",
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(shape))],
        initializer=[const],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def _onnx_save(folder: Path, nodes: list, inputs: list, outputs: list, initializers: list) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "model", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def onnx_conv(folder: Path, layers: int = 20, seed: int = 0) -> Path:
    """The conv benchmark model as ONNX (same architecture and weights as `conv`)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    plan = [(3, 64, 2)] + [(64, 64, 1)] * 9 + [(64, 128, 2)] + [(128, 128, 1)] * 9
    nodes, inits, prev = [], [], "input"
    for i, (cin, cout, stride) in enumerate(plan[:layers]):
        w = (rng.standard_normal((cout, cin, 3, 3)) * (2.0 / (cin * 9)) ** 0.5).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], strides=[stride, stride],
                                      pads=[1, 1, 1, 1]))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("ReduceMean", [prev], ["output"], axes=[2, 3], keepdims=0))
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    return _onnx_save(folder, nodes, inputs, outputs, inits)


def onnx_mlp(folder: Path, widths: tuple[int, ...] = (2048, 4096, 2048, 2048, 2048), seed: int = 0) -> Path:
    """The ~100 MB MLP as ONNX."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "input"
    for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
        w = (rng.standard_normal((cin, cout)) * (1.0 / cin) ** 0.5).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
        ]
        prev = f"r{i}"
    nodes[-1].output[0] = "output"
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, widths[0]])]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    return _onnx_save(folder, nodes, inputs, outputs, inits)


def slow(folder: Path, n: int = 2048, seed: int = 0) -> Path:
    """`y` = mean(broadcast(x) @ W) with an n×n W: one n³ MatMul per request (~0.15 s on one core at f32, n=2048).

    For tests that need requests provably in flight: with nireq 1 and INFERENCE_NUM_THREADS 1 they queue.
    """
    rng = np.random.default_rng(seed)
    param = ops.parameter([1, 1], np.float32, name="x")
    square = ops.broadcast(param, ops.constant(np.array([n, n], np.int64)))
    w = ops.constant((rng.standard_normal((n, n)) * 1e-3).astype(np.float32))
    out = ops.reduce_mean(ops.matmul(square, w, False, False), ops.constant(np.array([0, 1], np.int64)), keep_dims=True)
    out.output(0).get_tensor().set_names({"y"})
    return _save(ov.Model([out], [param], "slow"), folder)


def regroup(folder: Path, width: int = 10, group: int = 3) -> Path:
    """`a` = input `b` (N×width) reshaped to (-1, group): OpenVINO fails the inference itself unless N×width divides
    by `group` (a runtime error no validation can foresee)."""
    param = ops.parameter([-1, width], np.float32, name="b")
    out = ops.reshape(param, ops.constant(np.array([-1, group], np.int64)), special_zero=False)
    out.output(0).get_tensor().set_names({"a"})
    return _save(ov.Model([out], [param], "regroup"), folder)
