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

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

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


def clip(text: str, limit: int = 200) -> str:
    """``text`` shortened to at most ``limit`` characters at a word boundary, never mid-word."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:(") + "…"


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The element's bytes as written (for a message), without converting them."""
    try:
        raw = ds.get_item(keyword)
        value = getattr(raw, "value", raw)
        return clip(value.decode("ascii", "replace").strip("\x00 ") if isinstance(value, bytes) else str(value), 40)
    except Exception:  # the message must never fail on the file it describes
        return "?"


def element(ds: Dataset, keyword: str, convert: Callable[[Any], Any], default: Any = None) -> Any:
    """``convert(ds.keyword)``, or ``default`` when absent/empty; DicomError naming the tag when invalid.

    pydicom converts IS/DS/US values when they are first read, so a header holding letters where
    a number belongs raises there (a ValueError that names no file); this names the element instead.
    """
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        return convert(value)
    except Exception as exc:
        tag = tag_for_keyword(keyword)
        where = f"({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else ""
        vr = dictionary_VR(tag) if tag is not None else "?"
        raise DicomError(
            "invalid_header_value",
            f"{keyword} {where} holds '{_raw_text(ds, keyword)}', not a valid {vr} value ({type(exc).__name__})",
        ) from None


def _floats(value: Any) -> list[float]:
    return [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing (patient plane) first, then ImagerPixelSpacing (detector plane, projection X-ray)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = element(ds, keyword, _floats)
        if value is not None and len(value) == 2:
            row, col = value
            if row > 0 and col > 0:
                return row, col
    shared = element(ds, "SharedFunctionalGroupsSequence", lambda v: v)  # enhanced multi-frame objects
    if shared:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures and "PixelSpacing" in measures[0]:
            spacing = element(measures[0], "PixelSpacing", _floats)
            if spacing and len(spacing) == 2:
                return spacing[0], spacing[1]
    return None


def header_meta(ds: Dataset) -> dict[str, Any]:
    """The header facts linking, series assembly and the check summary need (JSON-serialisable)."""
    text = lambda keyword: str(element(ds, keyword, str, "")).strip()  # noqa: E731
    integer = lambda keyword, default=0: element(ds, keyword, int, default)  # noqa: E731
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    return {
        "patient_id": text("PatientID"),
        "modality": text("Modality"),
        "transfer_syntax": str(ts or ""),
        "photometric": text("PhotometricInterpretation"),
        "rows": integer("Rows"),
        "columns": integer("Columns"),
        "frames": max(1, integer("NumberOfFrames", 1)),
        "bits_stored": integer("BitsStored"),
        "spacing_mm": list(sp) if (sp := _pixel_spacing(ds)) else None,
        "series_uid": text("SeriesInstanceUID"),
        "series_description": text("SeriesDescription"),
        "series_number": _lenient(lambda: integer("SeriesNumber")),  # ordering only: a bad one is not a reason
        "instance_number": _lenient(lambda: integer("InstanceNumber")),
        "position": element(ds, "ImagePositionPatient", _floats),
        "orientation": element(ds, "ImageOrientationPatient", _floats),
        "note": getattr(ds, "fedmsk_note", ""),  # read without a meta header: said in the report
    }


_DEFER = "256 KB"  # values this large (pixel data) stay on disk until decoded

def _lenient(read: Callable[[], int]) -> int:
    try:
        return read()
    except DicomError:
        return 0


# elements the display pipeline converts: checked up front so a bad one is named, not a ValueError
_PIXEL_KEYWORDS = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "NumberOfFrames", "PlanarConfiguration", "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
)

# what the first bytes of a file say it is, for a file that is not DICOM
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive (also .xlsx/.docx)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an OLE document (Excel .xls / Word .doc)"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip archive"),
)


def _what_is(head: bytes) -> str:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    try:
        sample = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    if all(c.isprintable() or c in "\r\n\t" for c in sample):
        return f"a text file starting '{clip(sample, 40)}'"
    return "binary data of an unknown format"


def _looks_like_dataset(ds: Dataset) -> bool:
    """A force-read that produced real DICOM elements (text read by force gives nonsense tags)."""
    known = [t for t in ds.keys() if t.group in (0x0008, 0x0010, 0x0018, 0x0020, 0x0028, 0x7FE0)]
    return len(known) >= 3 and len(known) >= len(ds.keys()) // 2


def _read_without_meta(p: Path, header_only: bool) -> Dataset:
    """A file without the 'DICM' preamble: DICOM without its meta header (read, with a note) or not DICOM."""
    head = p.open("rb").read(132)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=header_only, force=True)
        usable = _looks_like_dataset(ds)
    except Exception:
        usable = False
    if not usable:
        raise DicomError("not_dicom", f"not a DICOM file: no 'DICM' marker at byte 128 and no DICOM elements at its "
                                      f"start; it looks like {_what_is(head)}", p)
    if not ds.file_meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.fedmsk_note = (f"DICOM without its meta header (no 'DICM' preamble): read as "
                      f"{UID(ds.file_meta.TransferSyntaxUID).name}")
    return ds


def _parsed_end(ds: Dataset) -> int | None:
    """Byte offset where the last top-level element read ends, or None when it cannot be told."""
    keys = list(ds.keys())
    if not keys:
        return None
    elem = ds.get_item(max(keys), keep_deferred=True)  # never read a deferred value (pixel data) for this
    tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return None
    return int(tell) + int(length)


def _check_complete(ds: Dataset, p: Path, size: int, header_only: bool) -> None:
    """A file cut short is 'truncated', whatever element the cut fell in (pydicom stops silently)."""
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if getattr(ds, "file_meta", None) is not None else ""
    if ts == DeflatedExplicitVRLittleEndian:
        return  # offsets are in the inflated stream
    end = _parsed_end(ds)
    if end is None:
        if not len(ds):
            raise DicomError("truncated", f"the file ends after its meta header ({size} bytes), before any element", p)
        return
    if end > size:
        last = ds.get_item(max(ds.keys()), keep_deferred=True)
        tag = last.tag
        if not dictionary_has_tag(tag) and not tag.is_private:
            raise DicomError("decode_failed", f"the header is damaged: {tag} at byte {end - last.length} "
                                              f"is no DICOM element (it declares {end - size} bytes beyond the file's end)", p)
        raise DicomError("truncated", f"the file ends at byte {size}, inside {tag} {keyword_for_tag(tag) or ''}"
                                      f" which needs {end - size} more byte(s)", p)
    if end >= size:
        return
    with p.open("rb") as fh:
        fh.seek(end)
        nxt = fh.read(12)
    if not nxt.strip(b"\x00"):
        return  # zero padding after the last element: some writers pad the file
    if not header_only and size - end < 12:  # a cut element header: too short to be another element
        raise DicomError("truncated", f"the file ends {size - end} byte(s) into an element header after byte {end}", p)
    if header_only:
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        if len(nxt) < 4:
            raise DicomError("truncated", f"the file ends {size - end} byte(s) into an element header after byte {end}", p)
        group = int.from_bytes(nxt[:2], "little" if little else "big")
        if group < 0x7FE0:  # pydicom stops before pixel data only; anything earlier means it stopped on damage
            raise DicomError("decode_failed", f"the header cannot be parsed beyond byte {end} of {size}", p)


def read_dataset(path: str | Path, header_only: bool = False, defer_pixels: bool = False) -> Dataset:
    """dcmread with intake's reasons: not DICOM (saying what it is), truncated, unparseable header.

    ``defer_pixels`` leaves large values (pixel data) on disk until read: for frame-wise decoding.
    """
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        raise DicomError("not_dicom", "empty file (0 bytes)", p)
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=header_only, defer_size=_DEFER if defer_pixels else None)
    except InvalidDicomError:
        ds = _read_without_meta(p, header_only)
    except (EOFError, OSError) as exc:
        raise DicomError("truncated", f"header ends early ({clip(str(exc))})", p) from None
    except Exception as exc:  # mangled headers / deflate streams: pydicom raises many types
        raise DicomError("decode_failed", f"header cannot be parsed ({type(exc).__name__}: {clip(str(exc))})", p) from None
    _check_complete(ds, p, size, header_only)
    return ds


def _guard(stage: str, p: Path, work: Callable[[], Any]) -> Any:
    """Run one stage on one file; any exception becomes that file's DicomError (stage in the detail)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on invalid values; the report says what matters
            return work()
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 -- one file's failure must never stop the others
        raise DicomError("decode_failed", f"{stage}: {type(exc).__name__}: {clip(str(exc))}", p) from None


def read_header(path: str | Path) -> dict[str, Any]:
    """Header facts without decoding pixels (cheap: used to link and group every file first)."""
    p = Path(path)
    return _guard("reading the header", p, lambda: header_meta(read_dataset(p, header_only=True)))


def _has_pixels(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _decodable(ds: Dataset, path: Path) -> str:
    """Refuse a dataset without usable pixel data or decoder before decoding; returns the transfer syntax."""
    for keyword in _PIXEL_KEYWORDS:
        element(ds, keyword, _floats)
    if not _has_pixels(ds):
        raise DicomError("no_pixel_data", f"no (7FE0,0010) Pixel Data (SOP class {ds.get('SOPClassUID', '?')})", path)
    if int(ds.get("Rows", 0) or 0) == 0 or int(ds.get("Columns", 0) or 0) == 0:
        raise DicomError("zero_size_image", f"Rows={ds.get('Rows')} Columns={ds.get('Columns')}", path)
    pixel_item = next(ds.get_item(k, keep_deferred=True) for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds)
    if getattr(pixel_item, "length", None) == 0 or (getattr(pixel_item, "value", None) is not None and len(pixel_item.value) == 0):
        raise DicomError("no_pixel_data", f"the {pixel_item.tag} pixel data element is empty (0 bytes)", path)
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
    return ts


def _decode_error(exc: Exception, ts: str, path: Path) -> DicomError:
    msg = clip(str(exc).replace("\n", " "))
    if any(s in msg for s in ("less than expected", "length of the pixel data", "shorter than", "insufficient")) or isinstance(exc, EOFError):
        return DicomError("truncated", f"pixel data is incomplete ({msg})", path)
    if "does not support" in msg or "precision" in msg:
        return DicomError(
            "unsupported_transfer_syntax",
            f"{syntax_name(ts)} with these parameters cannot be decoded here ({clip(msg, 160)}); "
            f"decoders: {decoder_package(ts)}", path,
        )
    return DicomError("decode_failed", f"{syntax_name(ts)}: {type(exc).__name__}: {msg}", path)


def stored_pixels(ds: Dataset, path: Path, frame: int | None = None) -> np.ndarray:
    """Stored values as pydicom decodes them (colour already in RGB), with intake's reasons.

    ``frame`` decodes that frame alone, read from the file: pydicom then reads only that frame's
    bytes, so memory does not grow with the number of frames (``ds`` was read without pixels).
    """
    ts = _decodable(ds, path)
    if frame is not None:
        frames = element(ds, "NumberOfFrames", int, 1)
        if not 0 <= frame < max(1, frames):
            raise DicomError("decode_failed", f"frame {frame} asked for, the file has {frames}", path)
    try:
        from_file = not getattr(ds, "fedmsk_note", "") and ts != DeflatedExplicitVRLittleEndian  # both need ds
        if frame is not None and from_file:
            return pixel_array(path, index=frame)
        arr = ds.pixel_array
        if frame is not None and element(ds, "NumberOfFrames", int, 1) > 1:
            arr = arr[frame]
        return arr
    except Exception as exc:  # pydicom and its plugins raise many types; each one is reported, never raised
        raise _decode_error(exc, ts, path) from None


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


def read_image(path: str | Path, frame: int | None = None) -> DecodedImage:
    """Decode a DICOM file to gray float32 pixels in [0, 1]; raises DicomError with a reason.

    ``frame=None`` decodes every frame ([frames, rows, cols] for a multi-frame file, scaled together);
    ``frame=k`` decodes frame k alone ([rows, cols]), without reading the other frames' bytes.
    """
    p = Path(path)

    def work() -> DecodedImage:
        ds = read_dataset(p, defer_pixels=frame is not None)
        stored = stored_pixels(ds, p, frame)
        values, voi = to_display(stored, ds)
        pixels = scale_unit(values, voi, monochrome1=str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1")
        if not np.isfinite(pixels).all():
            raise DicomError("decode_failed", "decoded pixels contain NaN/inf", p)
        return DecodedImage(pixels=pixels, spacing_mm=_pixel_spacing(ds), meta=header_meta(ds))

    return _guard("decoding the pixels", p, work)
