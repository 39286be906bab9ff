"""Multislice meshes: mesh.dcn_* axes span slices joined by the data-center network.

On CPU the "slices" are consecutive blocks of devices; the AOT test compiles for two real v5p
slices with libtpu's compile-only devices, which know their slice_index.
"""

import jax
import numpy as np
import pytest

from alignjax import aot, sharding as shd
from alignjax.cli import main as cli_main
from alignjax.config import load_config


def _slice_of(mesh, axis: str, n_slices: int, per_slice: int) -> list[set]:
    """For each index along `axis`: which CPU 'slices' (blocks of per_slice devices) it holds."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    ids = np.moveaxis(ids, shd.MESH_AXES.index(axis), 0)
    return [set((ids[i].ravel() // per_slice).tolist()) for i in range(ids.shape[0])]


def test_dcn_data_puts_each_half_of_the_data_axis_on_its_own_slice():
    devices = jax.devices()[:8]
    mesh = shd.make_mesh({"data": -1, "fsdp": 2, "dcn_data": 2}, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    # data indices 0-1 live on slice 0 (devices 0-3), 2-3 on slice 1: each fsdp group (one data
    # index) stays inside a slice, so only the data-parallel gradient reduction crosses DCN.
    assert _slice_of(mesh, "data", 2, 4) == [{0}, {0}, {1}, {1}]
    assert sorted(d.id for d in mesh.devices.ravel()) == list(range(8))


def test_dcn_fsdp_spans_slices_on_the_fsdp_axis():
    mesh = shd.make_mesh({"data": 1, "fsdp": -1, "dcn_fsdp": 2}, jax.devices()[:8])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert _slice_of(mesh, "fsdp", 2, 4) == [{0}] * 4 + [{1}] * 4


def test_one_slice_is_unchanged():
    a = shd.make_mesh({"data": 2, "fsdp": -1}, jax.devices()[:8])
    b = shd.make_mesh({"data": 2, "fsdp": -1, "dcn_data": 1, "dcn_fsdp": 1}, jax.devices()[:8])
    assert (a.devices == b.devices).all() and a.shape == b.shape


@pytest.mark.parametrize("sizes,words", [
    ({"data": -1, "dcn_data": 3}, "do not split into 3 slices"),
    ({"data": -1, "dcn_data": 0}, "mesh.dcn_data=0"),
    ({"data": 8, "dcn_data": 2}, "4 devices are in each of 2 slices"),
    ({"data": -1, "dcn_pipeline": 2}, "unknown axes"),
])
def test_bad_multislice_meshes_name_the_key(sizes, words):
    with pytest.raises(shd.ShardingError, match=words):
        shd.make_mesh(sizes, jax.devices()[:8])


def test_config_validation_reads_the_dcn_keys(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "configs/sft.py:tiny", "--workdir", str(tmp_path / "w"),
                  "--config.mesh.dcn_data=3"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "3 slices" in err and "Traceback" not in err
    assert load_config("configs/sft.py:tiny").mesh.dcn_data == 1  # the schema has the keys


needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason='libtpu (TPU compiler) not installed: pip install -e ".[tpu]"')


@pytest.mark.slow  # ~10 s of compiles: out of the 5-minute fast tier
@needs_libtpu
def test_multislice_aot_compile_reports_per_chip_memory(capsys):
    # v5p-8 is 4 chips; two slices are 8 chips, data-parallel across the slices.
    cli_main(["compile", "--config", "configs/sft.py:tiny", "--topology", "v5p-8", "--num-slices", "2"])
    out = capsys.readouterr().out
    assert "2 x v5p-8 (multislice) (8 chips)" in out
    assert "total per chip" in out and "FITS" in out and "DOES NOT FIT" not in out
    mesh = aot.topology_mesh("v5p-8", {"data": -1, "dcn_data": 2})
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[:4] == 0).all() and (slices[4:] == 1).all()  # the data axis crosses slices


@needs_libtpu
def test_num_slices_disagreeing_with_the_config_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["compile", "--config", "configs/sft.py:tiny", "--topology", "v5p-8",
                  "--num-slices", "3", "--config.mesh.dcn_fsdp=2"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "--num-slices 3" in err and "mesh.dcn_" in err and "Traceback" not in err
