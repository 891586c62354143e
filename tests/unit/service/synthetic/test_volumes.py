"""CT phantoms: deterministic from (seed, index); the nodule is a dense sphere inside a lung and its
mask says where; the series is a valid CT series (dciodvfy), one instance per slice, positions one
slice thickness apart along the normal while instance numbers run the other way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from service.synthetic.volumes import NODULE_HU, ct_series, make_ct_phantom, write_ct_series
from tests.unit.dicom_io.writers.writer_cases import dciodvfy

SMALL = {"shape": (12, 40, 40), "spacing": (2.5, 4.0, 4.0)}


def test_phantoms_are_deterministic_and_differ_by_index() -> None:
    a, b = make_ct_phantom(1, "nodule", seed=3, **SMALL), make_ct_phantom(1, "nodule", seed=3, **SMALL)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert not np.array_equal(a.hu, make_ct_phantom(2, "nodule", seed=3, **SMALL).hu)


@pytest.mark.parametrize("index", range(4))
def test_the_nodule_is_a_dense_sphere_inside_a_lung(index: int) -> None:
    phantom = make_ct_phantom(index, "nodule", seed=8)
    mask = phantom.lesion_mask
    assert mask.any() and np.all(phantom.lungs[mask])
    assert float(np.median(phantom.hu[mask])) > NODULE_HU[0] - 150  # blurred edges and noise aside
    assert float(np.median(phantom.hu[phantom.lungs & ~mask])) < -700
    assert not make_ct_phantom(index, "normal", seed=8).lesion_mask.any()


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValueError, match="effusion"):
        make_ct_phantom(0, "effusion")


def test_the_series_is_a_ct_series_sorted_by_position_not_number(tmp_path: Path) -> None:
    phantom = make_ct_phantom(0, "nodule", seed=2, **SMALL)
    paths = write_ct_series(tmp_path, phantom)
    assert len(paths) == SMALL["shape"][0]
    datasets = [pydicom.dcmread(path) for path in paths]
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    by_number = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
    z = [float(ds.ImagePositionPatient[2]) for ds in by_number]
    np.testing.assert_allclose(np.diff(z), -SMALL["spacing"][0])
    first = by_number[-1]  # lowest position: slice 0 of the phantom
    np.testing.assert_array_equal(
        first.pixel_array.astype(np.float64) + float(first.RescaleIntercept),
        np.clip(np.rint(phantom.hu[0]), -1024, 3071),
    )
    _, errors = dciodvfy(paths[0])
    assert not errors, "\n".join(errors)
    assert [ds.SOPInstanceUID for ds in ct_series(phantom)] == [ds.SOPInstanceUID for ds in by_number]
