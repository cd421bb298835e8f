"""The Gluon attention kernels' protocol without a GPU: tests/gluon_model.py runs a float64 transcription of
_fwd_kernel, _bwd_dkdv_kernel and _bwd_dq_kernel (every config of each) with a model of their asynchrony (ring
slots and mbarrier phases, wgmma groups and waits, barriers before refills, segments, zero fill past the sequence)
against an independent float64 reference, and checks that planted ordering / mask bugs are caught."""

import pytest

from tests import gluon_model as gm


def test_the_model_transcribes_the_current_kernels():
    # a kernel edit must be mirrored in tests/gluon_model.py (then KERNEL_SHA updated), or this model checks
    # something else than what runs on the GPU
    assert gm.kernel_sha() == gm.KERNEL_SHA, (
        "r4b/kernels/_varlen_gluon.py's Gluon functions changed: transcribe the change into tests/gluon_model.py "
        f"and set KERNEL_SHA = {gm.kernel_sha()!r}")


@pytest.mark.parametrize("plan", [(1, 64), (8, 8)], ids=["real-tiles", "tiles-over-8"])
def test_every_config_matches_float64_and_keeps_the_protocol(plan):
    f, unit = plan
    cf, _ = gm.read_configs()
    fc, kc, qc = gm.scaled(cf["CONFIGS"], f), gm.scaled(cf["DKDV_CONFIGS"], f), gm.scaled(cf["DQ_CONFIGS"], f)
    bad, kinds = [], set()
    for i in range(32):  # the case index cycles GQA 1/2/4/8, causal or not, and four kinds of length mixes
        desc, res, _ = gm.run_case((i, unit, 16, fc, kc, qc, ()))
        kinds.add(desc.split()[2])
        bad += [f"{kern} {cfg}: {err} ({desc})" for kern, cfg, err in res if err]
    assert len(kinds) == 4, kinds
    assert not bad, "\n".join(bad[:5])


def test_planted_protocol_and_mask_bugs_are_caught():
    assert gm.selftest()
