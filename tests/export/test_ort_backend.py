"""The ort backend: manifest checks (ManifestMismatch names the field), IO binding behaviour."""

from __future__ import annotations

import re
import shutil
import weakref

import pytest
import torch
from parity_helpers import random_feeds

from fastblt.engines.ort_backend import OrtBackend, _runner
from fastblt.engines.registry import available
from fastblt.errors import InputError, ManifestMismatch
from fastblt.export.spec import step_specs

from export_helpers import MAX_STEP


def test_registered_and_available():
    status = available()["ort"]
    assert status.available, status.reason
    assert "onnxruntime" in status.reason


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(max_step=MAX_STEP + 1), "graphs.entropy.inputs[2] (past.0.k).shape"),
        (dict(dtype="float16"), "graphs.entropy.inputs[2] (past.0.k).dtype"),
    ],
)
def test_specs_must_match_manifest(fp32_export, ref_model, change, field):
    kw = dict(max_step=MAX_STEP, dtype="float32") | change
    with pytest.raises(ManifestMismatch) as e:
        OrtBackend(step_specs(ref_model.config, **kw), fp32_export)
    assert field in str(e.value)


def test_steps_must_match_manifest(fp32_export, ref_model):
    cfg = ref_model.config.replace(blt_d=None)
    with pytest.raises(ManifestMismatch, match="field graphs: steps"):
        OrtBackend(step_specs(cfg, MAX_STEP), fp32_export)


def test_changed_or_missing_files(fp32_export, ref_model, tmp_path):
    specs = step_specs(ref_model.config, MAX_STEP)
    bad = tmp_path / "exp"
    shutil.copytree(fp32_export, bad)
    with open(bad / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestMismatch, match=r"graphs\.encoder\.sha256\[encoder\.onnx\]"):
        OrtBackend(specs, bad)
    (bad / "encoder.onnx").unlink()
    with pytest.raises(ManifestMismatch, match="graph file of encoder is missing"):
        OrtBackend(specs, bad, verify_hashes=False)
    with pytest.raises(ManifestMismatch, match="no manifest"):
        OrtBackend(specs, tmp_path)


def test_outputs_reused_per_shape_and_noncontiguous_inputs(fp32_export, ref_model):
    specs = step_specs(ref_model.config, MAX_STEP)
    with OrtBackend(specs, fp32_export, threads=1) as backend:
        feeds = random_feeds(specs["encoder"], ref_model.config, [5, 9], 3, seed=1)
        first = backend.run_step("encoder", feeds)
        h0, ptr = first["h"].clone(), first["h"].data_ptr()
        again = backend.run_step("encoder", feeds)
        assert again["h"].data_ptr() == ptr  # same shapes -> the same preallocated buffers
        torch.testing.assert_close(again["h"], h0, rtol=0, atol=0)
        other = backend.run_step("encoder", random_feeds(specs["encoder"], ref_model.config, [5, 9], 2, seed=2))
        assert other["h"].shape[1] == 2 and other["h"].data_ptr() != ptr
        strided = dict(feeds)
        strided["tokens"] = feeds["tokens"].t().contiguous().t()  # same values, transposed strides
        assert not strided["tokens"].is_contiguous()
        torch.testing.assert_close(backend.run_step("encoder", strided)["h"], h0, rtol=0, atol=0)


def test_feeds_seen_before_are_rebound_only_when_they_move(fp32_export, ref_model):
    """The backend skips binding a feed that is a tensor object it was fed before: new contents of
    that tensor, a new tensor at another address and a cache moved to new memory are all seen."""
    specs = step_specs(ref_model.config, MAX_STEP)
    spec = specs["decoder"]
    with OrtBackend(specs, fp32_export, threads=1) as backend, OrtBackend(specs, fp32_export, threads=1) as fresh:

        def alone(feeds):  # a backend that has bound nothing yet, on copies
            out = fresh.run_step("decoder", {k: v.clone() for k, v in feeds.items()})
            fresh._seen["decoder"] = [{} for _ in spec.inputs]
            fresh._bound["decoder"].clear()
            return out["logits"].clone()

        feeds = random_feeds(spec, ref_model.config, [7], 1, seed=3)
        want = alone(feeds)
        torch.testing.assert_close(backend.run_step("decoder", feeds)["logits"], want, rtol=0, atol=0)
        feeds["h"].copy_(random_feeds(spec, ref_model.config, [7], 1, seed=4)["h"])  # same object, new values
        want = alone(feeds)
        torch.testing.assert_close(backend.run_step("decoder", feeds)["logits"], want, rtol=0, atol=0)
        feeds["h"] = feeds["h"].clone() * 0.5  # a new tensor at another address
        want = alone(feeds)
        torch.testing.assert_close(backend.run_step("decoder", feeds)["logits"], want, rtol=0, atol=0)
        first = feeds["h"]  # two objects in turn (the runner feeds one view per shape): each rebound
        feeds["h"] = first.clone() * 2
        backend.run_step("decoder", feeds)
        feeds["h"] = first
        first.mul_(3)
        want = alone(feeds)
        torch.testing.assert_close(backend.run_step("decoder", feeds)["logits"], want, rtol=0, atol=0)
        moved = {k: (torch.zeros_like(v) if k.startswith("past.") else v) for k, v in feeds.items()}  # new memory
        old, want = feeds["past.0.k"].clone(), alone(moved)
        torch.testing.assert_close(backend.run_step("decoder", moved)["logits"], want, rtol=0, atol=0)
        assert moved["past.0.k"].abs().sum() > 0  # this step's keys went to the moved cache
        assert torch.equal(feeds["past.0.k"], old)  # and not to the one bound before
        gone = weakref.ref(moved["past.0.k"])
        del moved
        assert gone() is None  # the backend does not keep a cache its caller dropped (a grown global cache)


def test_the_direct_run_and_its_fallback_compute_the_same(fp32_export, ref_model):
    """The backend runs a binding on the pybind session where onnxruntime's wrapper exposes it, and
    through the public method where it does not: both write the same outputs."""
    specs = step_specs(ref_model.config, MAX_STEP)
    with OrtBackend(specs, fp32_export, threads=1) as backend:
        feeds = random_feeds(specs["encoder"], ref_model.config, [5, 9], 3, seed=5)
        want = backend.run_step("encoder", feeds)["h"].clone()
        session, binding = backend._sessions["encoder"], backend._bindings["encoder"]
        assert _runner(session, binding).func == session._sess.run_with_iobinding  # the direct call here

        class Public:  # a wrapper without the private attributes: its public method is used
            def __init__(self):
                self.calls = 0

            def run_with_iobinding(self, b):
                self.calls += 1
                session.run_with_iobinding(b)

        public = Public()
        backend._runs["encoder"] = _runner(public, binding)
        backend._own["encoder"]["h"].zero_()
        got = backend.run_step("encoder", feeds)["h"]
        assert public.calls == 1
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_longer_patches_rebind_no_output(fp32_export, ref_model):
    """A global step's latents do not read the patch length: a call whose patches are longer binds
    its new patch bytes and keeps the outputs bound, and computes what a fresh backend does."""
    specs = step_specs(ref_model.config, MAX_STEP)
    with OrtBackend(specs, fp32_export, threads=1) as backend, OrtBackend(specs, fp32_export, threads=1) as fresh:
        feeds = random_feeds(specs["global"], ref_model.config, [40], 2, seed=6)
        backend.run_step("global", feeds)  # the caches are written in place: the same tensors next
        latents = backend._own["global"]["latents"]
        longer = dict(feeds)
        L, D = feeds["patch_bytes"].shape[2:]
        longer["patch_bytes"] = torch.cat([feeds["patch_bytes"], torch.randn(1, 2, 3, D)], 2)
        longer["patch_lens"] = torch.tensor([[L + 3, 2]], dtype=torch.int32)
        copies = {k: v.clone() for k, v in longer.items()}
        calls = []
        original = backend._bind_outputs
        backend._bind_outputs = lambda *a: calls.append(a[0]) or original(*a)
        got = backend.run_step("global", longer)["latents"]
        assert calls == [] and got is latents  # outputs kept
        want = fresh.run_step("global", copies)
        torch.testing.assert_close(got, want["latents"], rtol=0, atol=0)
        torch.testing.assert_close(longer["past.0.k"], want["present.0.k"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("tokens", lambda t: t.to(torch.int64), "input tokens: dtype torch.int64, expected int32"),
        (
            "past.0.k",
            lambda t: torch.cat([t, t], 1),
            "input past.0.k: shape (2, 4, 40, 8), expected ('batch', 2, 40, 8)",
        ),
    ],
    ids=["int64-tokens", "cache-heads"],
)
def test_run_step_refuses_feeds_of_the_wrong_dtype_or_static_dim(fp32_export, ref_model, name, bad, message):
    """A feed of the wrong dtype (int64 tokens, numpy's default) or a cache with a wrong static dim
    must raise InputError naming the input before onnxruntime sees it, not an ORT error or reading
    memory as the wrong type."""
    specs = step_specs(ref_model.config, MAX_STEP)
    with OrtBackend(specs, fp32_export, threads=1) as backend:
        feeds = random_feeds(specs["encoder"], ref_model.config, [5, 9], 3, seed=7)
        feeds[name] = bad(feeds[name])
        with pytest.raises(InputError, match=re.escape(f"step encoder | {message}")):
            backend.run_step("encoder", feeds)
