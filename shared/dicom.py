"""Decode one DICOM file into display-ready gray pixels in [0, 1].

Hospitals export the same anatomy with different encodings (transfer syntaxes), photometric
interpretations, bit depths and display transforms. The model must see the same picture
whatever the export chose, so decoding follows the DICOM display pipeline in order:
stored values (pydicom, with its non-GPL decoder plugins) -> gray (colour images) ->
modality LUT (rescale slope/intercept or LUT) -> VOI LUT (LUT sequence or window) ->
MONOCHROME1 inverted, so bone is bright in every output -> scaled to [0, 1].

Failures are raised as ``DicomError`` carrying one of the reasons of ``shared.records`` so the
caller can report the file instead of crashing.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID

# Which package (never a GPL one) gives pydicom a decoder for a syntax it cannot read as installed.
# Keys are transfer syntax UID prefixes/values; the message reaches the hospital operator.
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pillow or python-gdcm",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "python-gdcm (8-bit) or pillow; 12-bit JPEG Extended is only read by "
    "pylibjpeg-libjpeg, which is GPL-3 and deliberately not a fedmsk dependency: re-export uncompressed or "
    "as JPEG 2000",
    "1.2.840.10008.1.2.4.57": "python-gdcm",  # JPEG lossless P14
    "1.2.840.10008.1.2.4.70": "python-gdcm",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "python-gdcm or pyjpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "python-gdcm or pyjpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg with pylibjpeg-openjpeg, or python-gdcm",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg with pylibjpeg-openjpeg, or python-gdcm",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg with pylibjpeg-openjpeg>=2.4",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg with pylibjpeg-openjpeg>=2.4",
    "1.2.840.10008.1.2.4.203": "pylibjpeg with pylibjpeg-openjpeg>=2.4",
    "1.2.840.10008.1.2.5": "pydicom itself (pylibjpeg-rle is faster)",  # RLE
}
_NO_DECODER = "no decoder package known to pydicom; ask the PACS to export as Explicit VR Little Endian or JPEG 2000"


class DicomError(Exception):
    """A file fedmsk cannot use as an image; ``reason`` is a key of shared.records.REASONS."""

    def __init__(self, reason: str, detail: str, path: str | Path | None = None) -> None:
        super().__init__(f"{path}: {reason}: {detail}" if path else f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail  # without the path: cached by content, the same for a renamed file


@dataclass
class DecodedImage:
    """Gray pixels in [0, 1]: [rows, cols], or [frames, rows, cols] for a multi-frame file.

    ``spacing_mm`` is (row, col) spacing in mm from PixelSpacing, else ImagerPixelSpacing, else None.
    ``meta`` holds the header facts intake reports and links on (see ``header_meta``).
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float] | None
    meta: dict[str, Any] = field(default_factory=dict)


def syntax_name(uid: str) -> str:
    """'JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)'; unknown UIDs as themselves."""
    u = UID(uid)
    return f"{u.name} ({uid})" if u.name != uid else uid


def decoder_package(uid: str) -> str:
    """The non-GPL package(s) that let pydicom decode this transfer syntax."""
    return _DECODER_PACKAGES.get(str(uid), _NO_DECODER)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing (patient plane) first, then ImagerPixelSpacing (detector plane, projection X-ray)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            row, col = float(value[0]), float(value[1])
            if row > 0 and col > 0:
                return row, col
    shared = ds.get("SharedFunctionalGroupsSequence")  # enhanced multi-frame objects
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures and "PixelSpacing" in measures[0]:
            row, col = (float(v) for v in measures[0].PixelSpacing)
            return row, col
    return None


def header_meta(ds: Dataset) -> dict[str, Any]:
    """The header facts linking, series assembly and the check summary need (JSON-serialisable)."""

    def floats(keyword: str) -> list[float] | None:
        value = ds.get(keyword)
        return [float(v) for v in value] if value is not None and len(value) else None

    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return {
        "patient_id": str(ds.get("PatientID", "") or "").strip(),
        "modality": str(ds.get("Modality", "") or ""),
        "transfer_syntax": str(ts or ""),
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "spacing_mm": list(sp) if (sp := _pixel_spacing(ds)) else None,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "series_description": str(ds.get("SeriesDescription", "") or ""),
        "series_number": int(ds.get("SeriesNumber", 0) or 0),
        "instance_number": int(ds.get("InstanceNumber", 0) or 0),
        "position": floats("ImagePositionPatient"),
        "orientation": floats("ImageOrientationPatient"),
        "has_pixels": any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
    }


def read_dataset(path: str | Path, header_only: bool = False) -> Dataset:
    """dcmread with intake's reasons: not DICOM, truncated (header cut short)."""
    p = Path(path)
    if p.stat().st_size == 0:
        raise DicomError("not_dicom", "empty file (0 bytes)", p)
    try:
        return pydicom.dcmread(p, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise DicomError("not_dicom", str(exc), p) from None
    except (EOFError, OSError) as exc:
        raise DicomError("truncated", f"header ends early ({exc})", p) from None
    except (zlib.error, ValueError, KeyError, TypeError) as exc:  # mangled headers / deflate streams
        raise DicomError("decode_failed", f"header cannot be parsed ({type(exc).__name__}: {exc})", p) from None


def read_header(path: str | Path) -> dict[str, Any]:
    """Header facts without decoding pixels (cheap: used to link and group every file first)."""
    return header_meta(read_dataset(path, header_only=True))


def stored_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values as pydicom decodes them (colour already in RGB), with intake's reasons."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError("no_pixel_data", f"no (7FE0,0010) Pixel Data (SOP class {ds.get('SOPClassUID', '?')})", path)
    if int(ds.get("Rows", 0) or 0) == 0 or int(ds.get("Columns", 0) or 0) == 0:
        raise DicomError("zero_size_image", f"Rows={ds.get('Rows')} Columns={ds.get('Columns')}", path)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if getattr(ds, "file_meta", None) is not None else ""
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError:
        raise DicomError(
            "unsupported_transfer_syntax", f"transfer syntax {syntax_name(ts)} cannot be decoded: {decoder_package(ts)}", path
        ) from None
    if not decoder.is_available:
        raise DicomError(
            "unsupported_transfer_syntax",
            f"no installed decoder for {syntax_name(ts)}; install {decoder_package(ts)}", path,
        )
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom and its plugins raise many types; each one is reported, never raised
        msg = str(exc).replace("\n", " ")
        if any(s in msg for s in ("less than expected", "length of the pixel data", "shorter than")) or isinstance(exc, EOFError):
            raise DicomError("truncated", f"pixel data is incomplete ({msg[:200]})", path) from None
        if "does not support" in msg or "precision" in msg:
            raise DicomError(
                "unsupported_transfer_syntax",
                f"{syntax_name(ts)} with these parameters cannot be decoded here ({msg[:160]}); "
                f"decoders: {decoder_package(ts)}", path,
            ) from None
        raise DicomError("decode_failed", f"{syntax_name(ts)}: {type(exc).__name__}: {msg[:200]}", path) from None


def _to_gray(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Colour (RGB, or YBR that pydicom already converted to RGB) -> luminance (ITU-R BT.601)."""
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        return arr
    rgb = arr.astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _voi_range(ds: Dataset) -> tuple[float, float] | None:
    """Output range of the VOI transform pydicom applies, or None when the file defines none.

    Scaling by this nominal range (not the image's own min/max) keeps the window the site's
    radiologists chose: values the window clips stay clipped.
    """
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0]:
        bits = int(seq[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        # pydicom's apply_windowing maps into the stored range after the modality LUT
        if ds.get("ModalityLUTSequence"):
            lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
        elif int(ds.get("PixelRepresentation", 0)) == 0:
            lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
        else:
            lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        if slope is not None and intercept is not None:
            lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
        return lo, hi
    return None


def to_display(arr: np.ndarray, ds: Dataset, window: bool = True) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Stored values -> gray display values (+ the VOI output range when a VOI transform was applied).

    ``window=False`` stops after the modality LUT (physical units such as HU), which is what a
    CT volume needs before it is scaled as a whole.
    """
    if int(ds.get("SamplesPerPixel", 1)) > 1:
        gray = _to_gray(arr, ds)
        bits = int(ds.get("BitsStored", 8))
        return gray, (0.0, float(2**bits - 1))
    values = apply_modality_lut(arr, ds)
    voi = _voi_range(ds) if window else None
    if voi is not None:
        if ds.get("VOILUTSequence") and values.dtype.kind == "f":
            values = np.rint(values).astype(np.int64)  # a LUT is indexed by integer modality values
        values = apply_voi_lut(values, _wide_lut_indices(ds), prefer_lut=True)
    return values.astype(np.float64), voi


def _wide_lut_indices(ds: Dataset) -> Dataset:
    """Work around pydicom 3.0.2 ``apply_voi``: it indexes an 8-bit LUT with uint8 indices, so a
    4096-entry LUT with 8-bit output wraps every 256 input values. Declaring 16-bit entries
    only widens the index type; the entries (and our output range) are unchanged."""
    seq = ds.get("VOILUTSequence")
    if not seq or int(seq[0].LUTDescriptor[2]) != 8:
        return ds
    item = Dataset(seq[0])
    item.LUTDescriptor = [int(v) for v in seq[0].LUTDescriptor[:2]] + [16]
    view = Dataset()
    view.file_meta = ds.file_meta
    view.VOILUTSequence = [item]
    return view


def scale_unit(values: np.ndarray, value_range: tuple[float, float] | None, monochrome1: bool) -> np.ndarray:
    """Scale to [0, 1] by the VOI range (or the data's own min/max) and invert MONOCHROME1."""
    lo, hi = value_range if value_range is not None else (float(np.min(values)), float(np.max(values)))
    out = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(values)
    if monochrome1:
        out = 1.0 - out
    return out.astype(np.float32)


def read_image(path: str | Path) -> DecodedImage:
    """Decode a DICOM file to gray float32 pixels in [0, 1]; raises DicomError with a reason."""
    p = Path(path)
    ds = read_dataset(p)
    stored = stored_pixels(ds, p)
    values, voi = to_display(stored, ds)
    pixels = scale_unit(values, voi, monochrome1=str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1")
    if not np.isfinite(pixels).all():
        raise DicomError("decode_failed", "decoded pixels contain NaN/inf", p)
    return DecodedImage(pixels=pixels, spacing_mm=_pixel_spacing(ds), meta=header_meta(ds))
