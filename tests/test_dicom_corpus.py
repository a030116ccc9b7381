"""Every transfer syntax and pixel case hospitals export, decoded to the expected array.

The corpus is one 12-bit image re-encoded in every syntax (pydicom's own encoders for RLE,
deflate and JPEG 2000; GDCM's for the JPEG family, JPEG-LS and big endian), plus pydicom's
bundled files where one picture ships in several encodings. Lossless syntaxes must decode to
exactly the uncompressed result, lossy ones to within their loss.
"""

from __future__ import annotations

from pathlib import Path

import gdcm
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from dicom_factory import make_dataset, ramp, task_config, write_dicom
from shared.dicom import DicomError, read_image
from shared.transforms import preprocess

BASE = ramp(48, 40, high=4095)  # 12 bits stored in 16


def _gdcm(src: Path, dst: Path, syntax: gdcm.TransferSyntax) -> Path:
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(syntax))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def _pydicom(src: Path, dst: Path, syntax: UID, **kwargs) -> Path:
    ds = pydicom.dcmread(src)
    ds.compress(syntax, **kwargs)
    ds.save_as(dst)
    return dst


# name -> (writer(base16, base8, out) -> file, lossless?, reference: "16" or "8" bit base)
TS = gdcm.TransferSyntax
CORPUS = {
    "implicit_vr_le": (lambda b, b8, o: write_dicom(o, BASE, bits_stored=12, syntax=ImplicitVRLittleEndian), True, "16"),
    "explicit_vr_le": (lambda b, b8, o: b, True, "16"),
    "explicit_vr_be": (lambda b, b8, o: _gdcm(b, o, TS.ExplicitVRBigEndian), True, "16"),
    "deflated": (lambda b, b8, o: write_dicom(o, BASE, bits_stored=12, syntax=DeflatedExplicitVRLittleEndian), True, "16"),
    "jpeg_baseline": (lambda b, b8, o: _gdcm(b8, o, TS.JPEGBaselineProcess1), False, "8"),
    "jpeg_extended_8bit": (lambda b, b8, o: _gdcm(b8, o, TS.JPEGExtendedProcess2_4), False, "8"),
    "jpeg_lossless_p14": (lambda b, b8, o: _gdcm(b, o, TS.JPEGLosslessProcess14), True, "16"),
    "jpeg_lossless_sv1": (lambda b, b8, o: _gdcm(b, o, TS.JPEGLosslessProcess14_1), True, "16"),
    "jpeg_ls_lossless": (lambda b, b8, o: _gdcm(b, o, TS.JPEGLSLossless), True, "16"),
    "jpeg_ls_near_lossless": (lambda b, b8, o: _gdcm(b, o, TS.JPEGLSNearLossless), False, "16"),
    "jpeg2000_lossless": (lambda b, b8, o: _pydicom(b, o, JPEG2000Lossless), True, "16"),
    "jpeg2000_lossy": (lambda b, b8, o: _pydicom(b, o, JPEG2000, j2k_psnr=[60]), False, "16"),
    "rle": (lambda b, b8, o: _pydicom(b, o, RLELossless), True, "16"),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, tuple[Path, bool, np.ndarray]]:
    folder = tmp_path_factory.mktemp("corpus")
    base16 = write_dicom(folder / "base16.dcm", BASE, bits_stored=12)
    base8 = write_dicom(folder / "base8.dcm", (BASE >> 4).astype(np.uint8))
    refs = {"16": read_image(base16).pixels, "8": read_image(base8).pixels}
    return {name: (make(base16, base8, folder / f"{name}.dcm"), lossless, refs[ref])
            for name, (make, lossless, ref) in CORPUS.items()}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_every_transfer_syntax_decodes_to_the_reference(corpus, name):
    path, lossless, reference = corpus[name]
    image = read_image(path)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == BASE.shape
    if lossless:
        np.testing.assert_allclose(image.pixels, reference, atol=1e-6)
    else:
        assert np.abs(image.pixels - reference).max() < 0.06
        assert np.abs(image.pixels - reference).mean() < 0.01


def test_bundled_files_of_one_picture_agree_across_syntaxes():
    """pydicom ships MR_small in seven encodings (implicit, big endian, RLE, JPEG-LS, J2K, ...)."""
    reference = read_image(get_testdata_file("MR_small.dcm")).pixels
    for name in ("MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_allclose(read_image(get_testdata_file(name)).pixels, reference, atol=1e-6, err_msg=name)
    deflated = read_image(get_testdata_file("image_dfl.dcm"))
    assert deflated.meta["transfer_syntax"] == DeflatedExplicitVRLittleEndian and deflated.pixels.max() == 1.0


def test_bundled_colour_files_become_the_same_gray_image():
    """RGB and YBR (JPEG baseline, lossless, J2K, RLE) encodings of one colour picture."""
    reference = read_image(get_testdata_file("SC_rgb_rle.dcm")).pixels
    assert reference.ndim == 2
    for name, tol in (("SC_rgb_jpeg_gdcm.dcm", 1e-6), ("SC_rgb_gdcm_KY.dcm", 0.03), ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 0.03),
                      ("SC_rgb_dcmtk_+eb+cy+np.dcm", 0.03)):
        assert np.abs(read_image(get_testdata_file(name)).pixels - reference).mean() < tol, name


def test_12bit_jpeg_extended_names_the_syntax_and_the_package():
    with pytest.raises(DicomError) as err:
        read_image(get_testdata_file("JPEG-lossy.dcm"))
    assert err.value.reason == "unsupported_transfer_syntax"
    assert "JPEG Extended" in err.value.detail and "pylibjpeg-libjpeg" in err.value.detail


def test_syntax_without_any_decoder_names_the_syntax(tmp_path):
    path = write_dicom(tmp_path / "mpeg.dcm", BASE)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2 video
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds.save_as(path)
    with pytest.raises(DicomError) as err:
        read_image(path)
    assert err.value.reason == "unsupported_transfer_syntax" and "MPEG2" in err.value.detail


# ---------------------------------------------------------------- pixel semantics
def test_rgb_and_ybr_become_bt601_luminance(tmp_path):
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., 0] = np.arange(10) * 25
    rgb[..., 1] = np.arange(8)[:, None] * 30
    rgb[..., 2] = 200
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    out = read_image(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB")).pixels
    np.testing.assert_allclose(out, gray / 255, atol=1e-5)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = read_image(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")).pixels
    np.testing.assert_allclose(out, gray / 255, atol=2 / 255)


def test_bits_above_bits_stored_are_ignored(tmp_path):
    clean = read_image(write_dicom(tmp_path / "c.dcm", BASE, bits_stored=12)).pixels
    dirty = read_image(write_dicom(tmp_path / "d.dcm", BASE | 0xF000, bits_stored=12)).pixels  # overlay bits set
    np.testing.assert_array_equal(dirty, clean)


def test_signed_pixels_rescale_and_window_agree(tmp_path):
    """CT in HU three ways: signed stored HU, unsigned + intercept, half-scale + slope 2."""
    hu = (np.add.outer(np.arange(32), np.arange(32)) * 40 - 1200).astype(np.int16)  # -1200 .. +1280 HU
    window = dict(WindowCenter=40, WindowWidth=400)
    signed = read_image(write_dicom(tmp_path / "s.dcm", hu, signed=True, RescaleSlope=1, RescaleIntercept=0, **window)).pixels
    shifted = read_image(write_dicom(tmp_path / "u.dcm", (hu + 1024).clip(0).astype(np.uint16),
                                     RescaleSlope=1, RescaleIntercept=-1024, **window)).pixels
    halved = read_image(write_dicom(tmp_path / "h.dcm", (hu // 2).astype(np.int16), signed=True,
                                    RescaleSlope=2, RescaleIntercept=0, **window)).pixels
    expected = np.clip((hu - (40 - 0.5)) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(signed, expected, atol=1e-4)
    keep = hu >= -1024  # the unsigned export clips air below -1024 HU, still black in this window
    np.testing.assert_allclose(shifted[keep], expected[keep], atol=1e-4)
    np.testing.assert_allclose(halved, expected, atol=3e-3)


def test_voi_lut_sequence_is_applied(tmp_path):
    stored = (np.arange(64).reshape(8, 8) * 64).astype(np.uint16)  # 0 .. 4032
    lut = (np.sqrt(np.arange(4096) / 4095) * 255).astype(np.uint16)  # a gamma curve to 8 bits
    ds = make_dataset(stored, bits_stored=12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.add_new("LUTData", "US", lut.tolist())  # US (not the dictionary's OW) so the list is written as is
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    out = read_image(tmp_path / "lut.dcm").pixels
    np.testing.assert_allclose(out, lut[stored] / 255, atol=1e-6)


def test_multiframe_keeps_frames_and_scales_them_together(tmp_path):
    frames = np.stack([BASE // 4, BASE // 2, BASE]).astype(np.uint16)
    out = read_image(write_dicom(tmp_path / "mf.dcm", frames, bits_stored=12)).pixels
    assert out.shape == (3, *BASE.shape)
    assert out[0].max() < out[1].max() < out[2].max() == 1.0


@pytest.mark.parametrize("tag", ["PixelSpacing", "ImagerPixelSpacing"])
def test_spacing_is_read_and_resampled_to_the_task_spacing(tmp_path, tag):
    bright = np.full((40, 20), 4000, np.uint16)  # 40 x 20 px at 0.5 x 1.0 mm = a 20 x 20 mm square
    bright[0, 0] = 0
    image = read_image(write_dicom(tmp_path / "sp.dcm", bright, **{tag: [0.5, 1.0]}))
    assert image.spacing_mm == (0.5, 1.0)
    out = preprocess(image.pixels, image.spacing_mm, task_config(image_size=[32, 32], spacing_mm=1.0))
    assert out.shape == (1, 32, 32)
    rows, cols = np.nonzero(out[0] > 0.5)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 == 20  # 20 mm stays 20 px, centred
    assert rows.min() == 6 and cols.min() == 6
