"""RFE (method="rfc") and the RCS schedule: properties, parity with the float64 reference,
refusals, and the hooks' one-decision-per-call rule (docs/method.md, "RFC")."""


import pytest
import torch

import foca_kernels as fk
from foca_kernels.methods import Method
from foca_kernels.rfc import RFCState
from helpers import study, study_options
from reference import RFCRef

BASES = [("foca", {"reading": "r3"}), (study("r6"), {}),  # r6: a study reading, built as a Method
         ("taylorseer", {"order": 1}), ("taylorseer", {"order": 2})]


def _ref_base(base, opts):
    """The reference's (base, options) of a base given by name or as a FoCa Method instance."""
    return ("foca", study_options(base)) if isinstance(base, Method) else (base, opts)


def _traj(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(shape, generator=g) for _ in range(3))
    return a, b, c


@pytest.mark.parametrize("base,opts", BASES)
@pytest.mark.parametrize("norm", ["token", "sample"])
@pytest.mark.parametrize("estimate", ["ratio", "gain"])
def test_exact_on_lines(base, opts, norm, estimate):
    """Inputs and outputs moving on straight lines together: every skipped step is exact."""
    a, b, _ = _traj((2, 5, 8))
    c, d, _ = _traj((2, 5, 8), seed=1)
    st = fk.allocate(a, "rfc", input=c, base=base, norm=norm, estimate=estimate, **opts)
    t = 0.0
    for k, full in enumerate([True, True, True, False, False, True, False, False, False, True, False]):
        h = 1.0 if k == 0 else (0.5 + 0.25 * (k % 3))
        t = 0.0 if k == 0 else t + h
        y, x = a + t * b, c + t * d
        if full:
            fk.update_(st, y, h, input=x)
        else:
            out = fk.forecast(st, h, input=x)
            assert torch.allclose(out, y, rtol=1e-5, atol=1e-5), (k, (out - y).abs().max())


@pytest.mark.parametrize("base,opts", BASES)
@pytest.mark.parametrize("norm", ["token", "sample"])
def test_input_on_its_forecast_gives_the_base_method(base, opts, norm):
    """When the input moves exactly as the base method forecasts it (|X - U0| = |X^ - U0|),
    RFE ('ratio') returns the base method's forecast."""
    y0 = _traj((3, 4, 6))
    u0 = _traj((3, 4, 6), seed=2)
    plain = fk.allocate(y0[0], base, **opts)
    st = fk.allocate(y0[0], "rfc", input=u0[0], base=base, norm=norm, **opts)
    probe = fk.allocate(u0[0], base, **opts)  # forecasts the input like RFE's input history does
    for k in range(8):
        y = y0[0] + k * y0[1] + 0.3 * k * k * y0[2]
        x = u0[0] + k * u0[1] - 0.2 * k * k * u0[2]
        if k < 3 or k == 5:
            fk.update_(plain, y)
            fk.update_(st, y, input=x)
            fk.update_(probe, x)
        else:
            x_on_forecast = fk.forecast(probe)
            expect = fk.forecast(plain)
            got = fk.forecast(st, input=x_on_forecast)
            assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5), (k, (got - expect).abs().max())


def test_input_unchanged_gives_reuse():
    """No input change since the last compute: no output change (the relational reading)."""
    y, u = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    st = fk.allocate(y, "rfc", input=u)
    fk.update_(st, y, input=u)
    fk.update_(st, y + 1, input=u + 0.5)
    out = fk.forecast(st, input=u + 0.5)
    assert torch.equal(out, y + 1)


@pytest.mark.parametrize("base,opts,estimate", [(b, o, e) for b, o in BASES for e in ("ratio", "gain")]
                         + [("reuse", {}, "ratio")])  # (reuse with "gain" is refused: test_refusals)
@pytest.mark.parametrize("norm", ["token", "sample"])
def test_matches_reference(base, opts, norm, estimate):
    g = torch.Generator().manual_seed(5)
    shape = (2, 7, 16)
    ys = [torch.randn(shape, generator=g) for _ in range(12)]
    xs = [torch.randn(shape, generator=g) for _ in range(12)]
    st = fk.allocate(ys[0], "rfc", input=xs[0], base=base, norm=norm, estimate=estimate, clip=3.0, **opts)
    ref_base, ref_opts = _ref_base(base, opts)
    ref = RFCRef(ref_base, norm=norm, estimate=estimate, clip=3.0, **ref_opts)
    full = [True, True, False, False, True, False, True, True, False, False, False, True]
    for k in range(12):
        h = [1.0, 1.0, 0.5, 2.0][k % 4]
        if full[k]:
            fk.update_(st, ys[k], h, input=xs[k])
            ref.full(ys[k].double(), xs[k].double(), h)
        else:
            got = fk.forecast(st, h, input=xs[k]).double()
            exp = ref.forecast(xs[k].double(), h)
            assert torch.allclose(got, exp, rtol=1e-5, atol=1e-5), (k, (got - exp).abs().max())


def test_fp32_triton_interpreter_matches_torch_backend():
    shape = (2, 9, 32)
    g = torch.Generator().manual_seed(1)
    seq = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(6)]
    outs = {}
    for backend in ("torch", "triton"):
        st = fk.allocate(seq[0][0], "rfc", input=seq[0][1])
        res = []
        for k, (y, x) in enumerate(seq):
            if k in (0, 1, 2):
                fk.update_(st, y, input=x, backend=backend)
            else:
                res.append(fk.forecast(st, input=x, backend=backend))
        outs[backend] = torch.stack(res)
    assert torch.allclose(outs["torch"], outs["triton"], rtol=1e-5, atol=1e-5)


def test_clip_bounds_the_scale():
    y, u = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    st = fk.allocate(y, "rfc", input=u, base="taylorseer", order=1, clip=2.0)
    fk.update_(st, y, input=u)
    fk.update_(st, y + 1, input=u + 1)
    out = fk.forecast(st, input=u + 101)  # input moved 100x what the line forecasts
    assert torch.allclose(out, y + 1 + 2.0 * 1)  # Y0 + clip * (Y^ - Y0)


def test_state_is_one_allocation_and_counted():
    y, u = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    st = fk.allocate(y, "rfc", input=u)
    assert isinstance(st, RFCState)
    assert st.out.slots.untyped_storage().data_ptr() == st.inp.slots.untyped_storage().data_ptr() == \
        st.storage.untyped_storage().data_ptr()
    r7 = {"reading": "r7"}  # RFE's default base
    assert st.nbytes == fk.state_nbytes(y, "rfc", input=u) == \
        fk.state_nbytes(y, "foca", **r7) + fk.state_nbytes(u, "foca", **r7)
    fk.update_(st, y, input=u)
    assert st.n_full == st.inp.n_full == 1


def test_refusals():
    y, u = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match="input="):
        fk.allocate(y, "rfc")  # no input example
    with pytest.raises(TypeError, match="input= is an option of method 'rfc'"):
        fk.allocate(y, "foca", input=u)
    with pytest.raises(ValueError, match="closed form"):
        fk.allocate(y, "rfc", input=u, base="foca", reading="r0")
    with pytest.raises(ValueError, match="same tokens"):
        fk.allocate(y, "rfc", input=torch.randn(2, 6, 8), norm="token")
    with pytest.raises(ValueError, match="same batch size"):
        fk.allocate(y, "rfc", input=torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="norm"):
        fk.allocate(y, "rfc", input=u, norm="channel")
    with pytest.raises(ValueError, match="estimate='gain'"):
        fk.allocate(y, "rfc", input=u, base="reuse", estimate="gain")
    with pytest.raises(ValueError, match="clip"):
        fk.allocate(y, "rfc", input=u, clip=0)
    st = fk.allocate(y, "rfc", input=u)
    with pytest.raises(ValueError, match="needs the module's input"):
        fk.update_(st, y)  # missing input
    assert st.n_full == 0 and st.inp.n_full == 0  # refused before any write
    fk.update_(st, y, input=u)
    fk.update_(st, y, input=u)
    with pytest.raises(ValueError, match="needs the module's input"):
        fk.forecast(st)
    with pytest.raises(ValueError, match="input has shape"):
        fk.forecast(st, input=torch.randn(2, 5, 9))  # a shape change
    with pytest.raises(TypeError, match="dtype"):
        fk.forecast(st, input=u.half())
    assert st.n_skip == 0 and st.inp.n_skip == 0
    st2 = fk.allocate(y, "foca")
    with pytest.raises(TypeError, match="input= is for states of method 'rfc'"):
        fk.update_(st2, y, input=u)
    with pytest.raises(ValueError, match="rfc cannot wrap itself"):
        fk.allocate(y, "rfc", input=u, base="rfc")


def test_forecast_too_early_is_refused():
    y, u = torch.randn(4, 8), torch.randn(4, 8)
    st = fk.allocate(y, "rfc", input=u)
    fk.update_(st, y, input=u)
    with pytest.raises(RuntimeError, match="needs 2 fully computed"):
        fk.forecast(st, input=u)
    assert st.n_skip == 0 and st.inp.n_skip == 0


def test_no_host_sync_in_a_skipped_step(monkeypatch):
    """The scale is a device tensor fed to the combination: no tensor is read on the host."""
    y, u = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    st = fk.allocate(y, "rfc", input=u)
    fk.update_(st, y, input=u)
    fk.update_(st, y + 1, input=u + 1)
    calls = []
    for name in ("item", "__float__", "__bool__", "tolist", "__int__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _n=name, **k):
            calls.append(_n)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    fk.forecast(st, input=u + 2)
    monkeypatch.undo()
    assert calls == []


def test_rfc_default_base_is_the_measured_foca_reading():
    """RFC's default FoCa base is the reading chosen for it by measurement (r7: docs/fidelity.md,
    "RFC"), pinned on its own (not whatever the package's default reading is), in the package and
    in the reference alike; an explicit reading still wins."""
    from foca_kernels.methods import DEFAULT_FOCA_READING
    from foca_kernels.rfc import RFC_FOCA_READING
    from reference import rfc as rfc_ref

    assert RFC_FOCA_READING == rfc_ref.RFC_FOCA_READING == "r7"
    assert rfc_ref.RFCRef("foca").out.reading == "r7" and rfc_ref.RFCRef("foca", reading="r3").out.reading == "r3"
    y, u = torch.zeros(4, 3), torch.zeros(4, 2)
    assert fk.allocate(y, "rfc", input=u).method.base.reading == "r7"
    assert fk.allocate(y, "rfc", input=u, reading="r3").method.base.reading == "r3"
    assert fk.allocate(y, "rfc", input=u, base=study("r6")).method.base.reading == "r6"
    assert fk.allocate(y, "foca").method.reading == DEFAULT_FOCA_READING
