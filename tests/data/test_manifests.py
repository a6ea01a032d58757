"""Samples drawn from a manifest (export's parity, the serving copy's check, int8's
calibration) cover every class and stop growing at their size."""

from imgclf.data.manifests import evenly_spaced


def test_evenly_spaced_samples_every_class_of_a_sorted_manifest():
    files = [f"c{c}/{i}.png" for c in range(10) for i in range(50)]  # sorted by class
    picked = evenly_spaced(files, 30)
    assert len(picked) == 30 and len(set(picked)) == 30
    assert {f.split("/")[0] for f in picked} == {f"c{c}" for c in range(10)}
    assert picked[0] == files[0] and picked[-1] == files[-1]
    assert evenly_spaced(files[:7], 30) == files[:7]  # fewer: all of them, in order
