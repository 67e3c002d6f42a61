"""The graph checks on hand-built ONNX graphs (each failure mode once) and on a real export."""

from __future__ import annotations

import dataclasses

import onnx
import pytest
from onnx import TensorProto, helper

from fastblt.errors import InputError
from fastblt.export.checks import _check_ort, check_hash_ids, check_io, check_trt_ops, load_trt_ops
from fastblt.export.options import ExportOptions
from fastblt.export.spec import step_specs

from export_helpers import MAX_STEP

F, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64


def _model(nodes, inputs, outputs, initializers=(), opset=20, domain_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset), *domain_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _typed(model):
    return onnx.shape_inference.infer_shapes(model)


def test_trt_ops_table_has_its_source_and_range():
    table = load_trt_ops()
    assert table.source.startswith("https://github.com/onnx/onnx-tensorrt/")
    assert (table.opset_min, table.opset_max) == (9, 24)
    assert {"FP32", "FP16", "BF16"} <= table.types["MatMul"]
    assert "INT32" not in table.types["MatMul"]
    assert table.const_inputs["ReduceMax"] == (1,)
    assert "Unique" not in table.types and "NonZero" in table.types


def test_trt_ops_pass_and_each_failure():
    table = load_trt_ops()
    ok = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                [_vi("a", F, [2, 3]), _vi("b", F, [3, 4])], [_vi("y", F, [2, 4])])  # fmt: skip
    assert check_trt_ops(_typed(ok), 20, table).status == "pass"
    assert "opset 20, expected 18" in check_trt_ops(_typed(ok), 18, table).detail

    int_mm = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                    [_vi("a", I32, [2, 3]), _vi("b", I32, [3, 4])], [_vi("y", I32, [2, 4])])  # fmt: skip
    r = check_trt_ops(_typed(int_mm), 20, table)
    assert r.status == "fail" and "data type INT32" in r.detail

    unique = _model([helper.make_node("Unique", ["a"], ["y"], name="u")], [_vi("a", F, [4])], [_vi("y", F, None)])
    r = check_trt_ops(_typed(unique), 20, table)
    assert r.status == "fail" and "Unique node 'u': not in TensorRT's operator list" in r.detail

    foo = helper.make_node("Foo", ["a"], ["y"], name="f", domain="my.ops")
    custom = _model([foo], [_vi("a", F, [4])], [_vi("y", F, [4])], domain_opsets=[helper.make_opsetid("my.ops", 1)])
    assert "custom domain 'my.ops'" in check_trt_ops(custom, 20, table).detail

    axes_input = _model([helper.make_node("ReduceMax", ["a", "axes"], ["y"], name="r")],
                        [_vi("a", F, [2, 3]), _vi("axes", I64, [1])], [_vi("y", F, None)])  # fmt: skip
    r = check_trt_ops(_typed(axes_input), 20, table)
    assert r.status == "fail" and "input 1 (axes) must be a build-time constant" in r.detail
    axes_const = _model([helper.make_node("ReduceMax", ["a", "axes"], ["y"], name="r")],
                        [_vi("a", F, [2, 3])], [_vi("y", F, None)],
                        [helper.make_tensor("axes", I64, [1], [1])])  # fmt: skip
    assert check_trt_ops(_typed(axes_const), 20, table).status == "pass"


def _hash_graph(nodes, initializers=()):
    return _typed(_model(nodes, [_vi("hash_ids", I32, [2, 3, 2])], [_vi("y", F, None)], initializers))


def test_hash_ids_may_only_be_sliced_cast_and_gathered():
    table = helper.make_tensor("table", F, [64, 4], [0.0] * 256)
    t0 = helper.make_tensor("t0", I64, [], [0])
    gathered = [
        helper.make_node("Gather", ["hash_ids", "t0"], ["h0"], axis=2, name="select"),
        helper.make_node("Cast", ["h0"], ["h64"], to=I64, name="cast"),
        helper.make_node("Gather", ["table", "h64"], ["y"], name="embed"),
    ]
    assert check_hash_ids(_hash_graph(gathered, [table, t0])).status == "pass"

    prime = helper.make_tensor("prime", I64, [], [1000000007])
    vocab = helper.make_tensor("vocab", I64, [], [64])
    hashed = [
        helper.make_node("Cast", ["hash_ids"], ["h64"], to=I64, name="cast"),
        helper.make_node("Mul", ["h64", "prime"], ["p"], name="times_prime"),
        helper.make_node("Mod", ["p", "vocab"], ["m"], name="mod_vocab"),
        helper.make_node("Gather", ["table", "m"], ["y"], name="embed"),
    ]
    r = check_hash_ids(_hash_graph(hashed, [table, prime, vocab]))
    assert r.status == "fail"
    assert "Mul node 'times_prime' computes on hashed values (INT64)" in r.detail
    assert "Mod node 'mod_vocab' computes on int64" in r.detail


def test_io_check_compares_against_the_spec(fp32_export, ref_model):
    proto = onnx.load(str(fp32_export / "entropy.onnx"), load_external_data=False)
    good = step_specs(ref_model.config, MAX_STEP)["entropy"]
    assert check_io(proto, good).status == "pass"
    other = step_specs(ref_model.config, MAX_STEP * 2)["entropy"]
    r = check_io(proto, other)
    assert r.status == "fail" and "input past.0.k: shape" in r.detail


def test_exported_graphs_compute_no_hashes(fp32_export):
    encoder = _typed(onnx.load(str(fp32_export / "encoder.onnx"), load_external_data=False))
    r = check_hash_ids(encoder)
    assert r.status == "pass" and "only sliced/cast/offset/gathered" in r.detail


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(dtype="int8"), "dtype 'int8': unsupported"),
        (dict(opset=21), "opset 21: unsupported"),
        (dict(max_step=1), "max_step 1"),
        (dict(max_batch=0), "max_batch 0"),
    ],
)
def test_export_options_are_validated(kw, message):
    with pytest.raises(InputError, match=message):
        ExportOptions(**kw)
    assert ExportOptions(dtype="bf16").dtype == "bfloat16"


def test_io_check_compares_dtypes(fp32_export, ref_model):
    """An fp32 graph checked against the fp16 spec (same names and shapes) must fail on its dtype,
    or an export could record graphs whose caches the runtime then feeds in the wrong precision."""
    proto = onnx.load(str(fp32_export / "entropy.onnx"), load_external_data=False)
    fp16 = step_specs(ref_model.config, MAX_STEP, "float16")["entropy"]
    r = check_io(proto, fp16)
    assert r.status == "fail" and "input past.0.k: dtype float32, expected float16" in r.detail


def test_trt_ops_opset_outside_the_tables_range():
    """A model opset TensorRT's list does not cover must fail the gate, not be waved through."""
    table = dataclasses.replace(load_trt_ops(), opset_max=20)
    mm = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                [_vi("a", F, [2, 3]), _vi("b", F, [3, 4])], [_vi("y", F, [2, 4])], opset=21)  # fmt: skip
    r = check_trt_ops(_typed(mm), 21, table)
    assert r.status == "fail" and "opset 21 outside TensorRT's range 9..20" in r.detail
    assert check_trt_ops(_typed(mm), 21, load_trt_ops()).status == "pass"


def test_trt_ops_model_local_functions_fail():
    """TensorRT's parser does not inline model-local functions: a graph carrying any must fail."""
    body = helper.make_function("my.fns", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                                [helper.make_opsetid("", 20)])  # fmt: skip
    mm = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                [_vi("a", F, [2, 3]), _vi("b", F, [3, 4])], [_vi("y", F, [2, 4])])  # fmt: skip
    mm.functions.append(body)
    r = check_trt_ops(mm, 20, load_trt_ops())
    assert r.status == "fail" and "model-local functions ['Twice']" in r.detail


def test_hash_ids_offset_only_by_a_constant():
    """Adding a table's constant base row keeps hash ids an index; adding another graph input is
    arithmetic on hashed values (the host's hashing could move into the graph) and must fail."""
    table = helper.make_tensor("table", F, [64, 4], [0.0] * 256)
    base = helper.make_tensor("base", I32, [], [16])
    offset = [
        helper.make_node("Add", ["hash_ids", "base"], ["h"], name="offset"),
        helper.make_node("Gather", ["table", "h"], ["y"], name="embed"),
    ]
    assert check_hash_ids(_hash_graph(offset, [table, base])).status == "pass"
    inputs = [_vi("hash_ids", I32, [2, 3, 2]), _vi("base", I32, [])]
    mixed = _typed(_model(offset, inputs, [_vi("y", F, None)], [table]))
    r = check_hash_ids(mixed)
    assert r.status == "fail" and "Add node 'offset' computes on hashed values (INT32)" in r.detail


def test_ort_check_fails_a_float32_graph_it_cannot_load(tmp_path, ref_model):
    """Only a bfloat16 graph without an ORT CPU kernel is skipped: a float32 graph that onnxruntime
    cannot load (here NOT_IMPLEMENTED, the bf16 error code) fails, or a broken export would pass."""
    bern = _model([helper.make_node("Bernoulli", ["a"], ["y"], name="b")], [_vi("a", F, [2, 3])],
                  [_vi("y", F, [2, 3])], opset=24)  # fmt: skip
    path = tmp_path / "entropy.onnx"
    onnx.save(bern, str(path))
    import onnxruntime as ort

    try:  # the premise: this onnxruntime has no float32 Bernoulli kernel (1.20-1.32 have none)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pytest.skip(f"onnxruntime {ort.__version__} runs float32 Bernoulli: this test needs another such op")
    except Exception as e:  # noqa: BLE001 (onnxruntime's own exception types)
        assert "NOT_IMPLEMENTED" in str(e)
    r = _check_ort(path, step_specs(ref_model.config, MAX_STEP)["entropy"])
    assert r.status == "fail" and r.detail.startswith("entropy.onnx: ") and "NOT_IMPLEMENTED" in r.detail
