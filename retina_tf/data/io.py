"""Reading and writing the image, label and mask files of the public fundus datasets.

``tf.io.decode_image`` reads neither TIFF (DRIVE, HRF) nor PPM (STARE) and returns GIFs (DRIVE
labels and masks) as frame stacks, so files are decoded with OpenCV, GIFs with Pillow, and
``.gz`` files (STARE) are decompressed in memory first. Every problem with a file surfaces as a
:class:`DatasetError` that names the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import glob
import gzip
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from retina_tf.data import av as av_lib
from retina_tf.data.fov import estimate_fov, given_fov_warning
from retina_tf.errors import DatasetError, OutputError

__all__ = ["DatasetError", "SampleData", "atomic_write_bytes", "file_stem", "read_av",
           "fov_of_array", "is_dicom_file", "is_gray", "read_fov_mask", "read_image", "read_mask",
           "read_sample", "write_image_atomic"]

if TYPE_CHECKING:
    from retina_tf.data.catalog import Sample

PathLike = str | os.PathLike

log = logging.getLogger(__name__)


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        if path.is_symlink() and not path.exists():
            what = f"is a link to {os.readlink(path)}, which does not exist"
        raise DatasetError(f"{path} {what}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path} cannot be read: {err}") from err
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DatasetError(f"{path} is not a complete gzip file: {err}") from err
    if not data:
        raise DatasetError(f"{path} is empty")
    return data


def _looks_truncated(data: bytes) -> bool:
    """Catches truncated JPEG and PNG files that some OpenCV versions decode partially."""
    if data[:3] == b"\xff\xd8\xff":
        # Entropy-coded JPEG data never holds FF D9 (FF is byte-stuffed), so a file whose tail
        # lacks the end-of-image marker was cut short.
        return b"\xff\xd9" not in data[-4096:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-64:]
    return False


def _check_jpeg(path: Path, data: bytes) -> None:
    """Rejects a JPEG whose entropy-coded data is corrupt.

    libjpeg treats damaged scan data as a recoverable error: it prints "Corrupt JPEG data: ..."
    on stderr and OpenCV returns the garbled picture. simplejpeg wraps the same libjpeg-turbo
    and raises on those warnings with ``strict=True``. A file that simplejpeg cannot decode even
    leniently (CMYK, 12-bit JPEG) is not a warning: OpenCV decides on it as before.

    Raises:
        DatasetError: naming the file and libjpeg's complaint.
    """
    try:
        simplejpeg.decode_jpeg(data, strict=True)
    except (ValueError, RuntimeError) as strict_err:
        try:
            simplejpeg.decode_jpeg(data, strict=False)
        except (ValueError, RuntimeError):
            return
        raise DatasetError(f"{path} is a corrupt JPEG (the decoder says: {strict_err}); "
                           "copy or export the file again") from strict_err


def bit_depth(max_value: int) -> int:
    """The bit depth of 16-bit-stored data, inferred from its largest value: 8, 10, 12, 14 or 16.

    Cameras and converters store 10-, 12- and 14-bit data in 16-bit files without saying so;
    the largest value is the only evidence (a 12-bit image with no value above 1023 reads as
    10-bit, i.e. brighter).
    """
    for bits in (8, 10, 12, 14):
        if max_value < 2 ** bits:
            return bits
    return 16


def _to_uint8(path: Path, array: np.ndarray) -> np.ndarray:
    """Maps the data's full scale (``2**bits - 1``, see :func:`bit_depth`) to 255: a fixed
    scale per bit depth, not a per-image contrast stretch."""
    if array.dtype == np.uint8:
        return array
    if array.dtype != np.uint16:
        raise DatasetError(f"{path} has pixels of type {array.dtype}: save it with 8 or 16 bits "
                           "per channel (e.g. PNG or TIFF)")
    bits = bit_depth(int(array.max()))
    scale = np.float32(255.0 / (2 ** bits - 1))
    return np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)


# EXIF orientation (tag 0x0112) -> the array operation that shows the picture upright.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


# OpenCV's decoders refuse files of more pixels (its OPENCV_IO_MAX_IMAGE_PIXELS, 2^30 unless
# set); Pillow's own limit is lower (a warning above 89 M pixels, a refusal above 179 M) and
# is set to OpenCV's where Pillow reads, so that every format reads up to the same size.
def _opencv_pixel_limit(text: str | None) -> int:
    """OPENCV_IO_MAX_IMAGE_PIXELS as OpenCV reads it: a count, or one in KB or MB (of 1024;
    KB, Kb or kb); OpenCV itself aborts on other forms when it is imported."""
    match = re.fullmatch(r"(\d+)(KB|Kb|kb|MB|Mb|mb)?", text or "")
    if not match:
        return 1 << 30
    return int(match[1]) << {None: 0, "K": 10, "M": 20}[match[2] and match[2][0].upper()]


MAX_PIXELS = _opencv_pixel_limit(os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS"))


@contextlib.contextmanager
def _pillow_reads_up_to_max_pixels():
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2  # Pillow refuses above twice its limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _too_large(path: Path) -> DatasetError:
    return DatasetError(f"{path} has over {MAX_PIXELS:,} pixels, more than the "
                        "image decoders read (OPENCV_IO_MAX_IMAGE_PIXELS): shrink it first (a "
                        "fundus photograph needs far fewer)")


def _exif_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG, TIFF, PNG or WebP file (1, upright, when it has none)."""
    if not (data[:3] == b"\xff\xd8\xff" or _is_tiff(data)
            or data[:8] == b"\x89PNG\r\n\x1a\n" or data[8:12] == b"WEBP"):
        return 1
    try:
        with _pillow_reads_up_to_max_pixels(), Image.open(io.BytesIO(data)) as im:  # the header
            orientation = im.getexif().get(0x0112, 1)
    except Exception:  # metadata only: OpenCV decodes or refuses the pixels below
        return 1
    return orientation if orientation in _UPRIGHT else 1


def _tiff_upright_as_stored(data: bytes) -> bytes:
    """``data`` with a TIFF's orientation tag set to 1 (upright as stored), so that the pixels
    come from OpenCV as stored and :data:`_UPRIGHT` turns them once: under ``IMREAD_UNCHANGED``
    OpenCV ignores a JPEG's or PNG's EXIF orientation but applies a TIFF's (OpenCV 5; even
    with ``IMREAD_IGNORE_ORIENTATION``). Other files, and TIFFs without the tag, are returned
    as they are."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(data[:4])
    if order is None or len(data) < 8:
        return data
    ifd = int.from_bytes(data[4:8], "little" if order == "<" else "big")
    if ifd + 2 > len(data):
        return data
    end = "little" if order == "<" else "big"
    for i in range(int.from_bytes(data[ifd:ifd + 2], end)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(data):
            break
        # a SHORT (type 3), one value, stored in the entry's first two value bytes
        if (int.from_bytes(data[entry:entry + 2], end) == 0x0112
                and int.from_bytes(data[entry + 2:entry + 4], end) == 3):
            patched = bytearray(data)
            patched[entry + 8:entry + 10] = (1).to_bytes(2, end)
            return bytes(patched)
    return data


def _is_dicom(data: bytes) -> bool:
    """A DICOM (Part 10) file: 128 bytes of preamble, then ``DICM``."""
    return data[128:132] == b"DICM"


def _is_tiff(data: bytes) -> bool:
    """A TIFF file, by its byte order mark and magic number (Intel or Motorola)."""
    return data[:4] in (b"II*\x00", b"MM\x00*")


def is_dicom_file(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM file, by its first 132 bytes (cameras and CDs name them
    ``IM000001`` or by a UID, with no image extension)."""
    try:
        with open(path, "rb") as f:
            return _is_dicom(f.read(132))
    except OSError:
        return False


def _decode_dicom(path: Path, data: bytes, picture: int | None = None) -> np.ndarray:
    """The picture of a DICOM file (ophthalmic photography: how many fundus cameras and
    clinical archives export), read with pydicom: YBR colour (a JPEG's) converted to RGB,
    MONOCHROME1 inverted so that bright is bright, and the file's ``BitsStored`` mapped to 8
    bits; where it says 16, by the data's largest value as a 16-bit PNG's (:func:`bit_depth`:
    cameras store 12-bit data so, which read as 16-bit came out in 15 grey levels). A
    multi-frame file (a
    stereo pair, a series) is read one frame at a time (``picture``, 0 first), and refused
    rather than read in part without one.
    """
    import pydicom  # here: only DICOM files need it

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:  # a report, a measurement, or a file cut short
            raise DatasetError(f"{path} is a DICOM file without a picture (no pixel data): "
                               "give the file of the photograph, or copy it again")
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames, bits = int(ds.get("NumberOfFrames") or 1), int(ds.BitsStored)
        if "PhotometricInterpretation" not in ds:
            raise DatasetError(f"{path}: its DICOM header has no Photometric Interpretation "
                               "(0028,0004), which says how to read its colours: export it "
                               "again with one (RGB, YBR_FULL or MONOCHROME2)")
        photometric = str(ds.PhotometricInterpretation)
    except DatasetError:
        raise
    except Exception as err:  # noqa: BLE001 (pydicom raises many kinds on a broken file)
        raise DatasetError(f"{path} is not a readable DICOM file: {err}") from None
    if rows * columns > MAX_PIXELS:
        raise _too_large(path)
    if frames > 1 and picture is None:
        raise _several_pictures(path, frames, "frames", "DICOM file")
    _check_picture(path, picture, frames, "frames")
    signed = int(ds.get("PixelRepresentation", 0)) != 0
    if signed or not 1 <= bits <= 16:
        raise DatasetError(f"{path} stores {'signed ' if signed else ''}{bits}-bit pixels, not "
                           "a photograph's 8 to 16 unsigned bits: export it as an 8-bit PNG "
                           "or TIFF")
    try:
        if frames > 1:
            ds.pixel_array_options(index=picture)  # that frame alone is decoded
        array = ds.pixel_array  # pydicom converts YBR (JPEG) to RGB
    except Exception as err:  # noqa: BLE001 (a missing decoder, corrupt data)
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "its transfer syntax")
        why = re.sub(r"\s*\n\s*", "; ", str(err).strip()).replace(":;", ":")  # one line
        raise DatasetError(f"{path}: pydicom cannot decode its pixels ({syntax}): {why}"
                           ) from None
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut
        array, bits = apply_color_lut(array, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    if bits == 16:
        bits = bit_depth(int(array.max()))
    top = 2 ** bits - 1
    array = np.minimum(array, top)
    if photometric == "MONOCHROME1":
        array = top - array
    if bits != 8 or array.dtype != np.uint8:
        array = np.rint(array * np.float32(255.0 / top)).astype(np.uint8)
    return np.ascontiguousarray(array)


def _full_size_pictures(data: bytes) -> tuple[list[int], str]:
    """The full-size pictures of a file, by their index in it (TIFF pages, GIF / PNG / WebP
    animation frames; pages smaller than the first, a thumbnail or a pyramid's levels, left
    out), and what they are called; ([0], "") for a single picture or where Pillow cannot
    tell."""
    tiff = _is_tiff(data)
    animated = (data[:6] in (b"GIF87a", b"GIF89a") or (data[:8] == b"\x89PNG\r\n\x1a\n"
                                                       and b"acTL" in data[:4096])
                or (data[:4] == b"RIFF" and data[8:12] == b"WEBP" and b"ANIM" in data[:4096]))
    if not (tiff or animated):
        return [0], ""
    try:
        with warnings.catch_warnings():  # of a broken file: OpenCV's decoder has its one line
            warnings.simplefilter("ignore")
            with _pillow_reads_up_to_max_pixels(), Image.open(io.BytesIO(data)) as picture:
                frames = int(getattr(picture, "n_frames", 1))
                if frames <= 1:
                    return [0], ""
                size, full = picture.size, [0]
                for i in range(1, frames):
                    picture.seek(i)
                    if picture.size[0] >= size[0] and picture.size[1] >= size[1]:
                        full.append(i)
    except Exception:  # noqa: BLE001 (OpenCV's decoder then has its say)
        return [0], ""
    return (full, "pages" if tiff else "frames") if len(full) > 1 else ([0], "")


def picture_count(path: PathLike) -> tuple[int, str]:
    """How many photographs a file holds that :func:`read_image` reads one at a time (its
    ``picture``), and what they are called: the frames of a DICOM file, the full-size pages of
    a TIFF (a stereo pair, a series); (1, "") for a file of one picture, for an animation
    (GIF, PNG, WebP: refused, no photographs) and for a file that cannot be read (reading it
    then says why)."""
    path = Path(path)
    try:
        if not path.name.lower().endswith(".gz"):  # most files: their first bytes tell
            with open(path, "rb") as f:
                head = f.read(132)
            if _is_dicom(head):
                return _dicom_frames(path)  # its header alone, not its pixels
            if not _is_tiff(head):
                return 1, ""
        data = _read_bytes(path)
    except (OSError, DatasetError):
        return 1, ""
    if _is_dicom(data):
        return _dicom_frames(io.BytesIO(data))
    pages, kind = _full_size_pictures(data)
    return (len(pages), kind) if kind == "pages" else (1, "")


def _dicom_frames(source) -> tuple[int, str]:
    """:func:`picture_count` of a DICOM file (a path or a file object), from its header."""
    try:
        import pydicom  # here: only DICOM files need it

        header = pydicom.dcmread(source, stop_before_pixels=True)
        frames = int(header.get("NumberOfFrames") or 1)
    except Exception:  # noqa: BLE001 (reading it says what is wrong)
        return 1, ""
    return (frames, "frames") if frames > 1 else (1, "")


def _check_picture(path: Path, picture: int | None, count: int, kind: str) -> None:
    """Refuses a ``picture`` index a file of ``count`` pictures does not have."""
    if picture is not None and not 0 <= picture < count:
        held = f"{count} {kind}" if count > 1 else "one picture"
        raise DatasetError(f"{path} holds {held}: there is no picture {picture} (0 is the "
                           "first)")


def _several_pictures(path: Path, count: int, kind: str, container: str = "file"
                      ) -> DatasetError:
    """The error of a file of ``count`` pictures (``kind``: "pages", "frames"), refused
    rather than read in part."""
    # predict reads them one at a time (picture_count); an animation is no photograph
    split = (f"bin/predict.py segments each {kind[:-1]} (in Python: read_image(path, "
             "picture)); elsewhere " if container != "file" or kind == "pages" else "")
    return DatasetError(f"{path} holds {count} pictures ({kind}) in one {container}: {split}"
                        f"save each {kind[:-1]} as a file of its own")


def _decode(path: PathLike, data: bytes | None = None, picture: int | None = None
            ) -> np.ndarray:
    """Decodes a file as displayed: ``HxW`` for one-channel files, ``HxWx3`` RGB otherwise,
    uint8, turned upright by the file's EXIF orientation (phones and some cameras store pictures
    sideways with a tag saying so; viewers, and the user who drew the labels, see them upright).

    Grayscale files stay 2-D so that index maps (HRF-AV) keep their values; RGB files whose
    three channels are equal (HRF masks) are returned as given, callers collapse them.
    ``data``: the file's bytes, when the caller has read them already. ``picture``: which
    frame of a DICOM file or page of a TIFF (:func:`picture_count`); a file of several
    full-size pictures is refused without one (OpenCV and Pillow would read its first alone,
    the others left out in silence).
    """
    path = Path(path)
    data = _read_bytes(path) if data is None else data
    if _is_dicom(data):
        return _decode_dicom(path, data, picture)
    pictures, kind = _full_size_pictures(data)
    if len(pictures) > 1 and (picture is None or kind != "pages"):
        raise _several_pictures(path, len(pictures), kind)
    _check_picture(path, picture, len(pictures), kind)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        try:
            with _pillow_reads_up_to_max_pixels(), Image.open(io.BytesIO(data)) as gif:
                gif.seek(0)
                # a transparent colour as black, as a PNG's alpha (_over_black)
                transparent = "transparency" in gif.info
                frame = gif.convert("RGBA" if transparent else "RGB")
        except Image.DecompressionBombError as err:
            raise _too_large(path) from err
        except (OSError, ValueError, SyntaxError) as err:
            raise DatasetError(f"{path} is not a readable GIF: {err}") from err
        array = np.asarray(frame)
        if transparent:
            array = _over_black(array)
        # Gray GIFs (DRIVE labels and masks) come back with three equal channels.
        if is_gray(array):
            return np.ascontiguousarray(array[..., 0])
        return array
    if _looks_truncated(data):
        raise DatasetError(f"{path} is truncated (no end-of-image marker)")
    if data[:3] == b"\xff\xd8\xff":
        _check_jpeg(path, data)
    level = cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:  # a broken file gets the one line below, not OpenCV's decoder errors too
        if len(pictures) > 1:  # that page alone, turned upright by OpenCV by its own tag
            page = pictures[picture]
            _, pages = cv2.imdecodemulti(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED,
                                         None, (page, page + 1))
            array = pages[0] if len(pages) == 1 else None
        else:
            array = cv2.imdecode(np.frombuffer(_tiff_upright_as_stored(data), np.uint8),
                                 cv2.IMREAD_UNCHANGED)
    except cv2.error as err:  # the one decoder error that is not a None: the size limit
        raise _too_large(path) if "CV_IO_MAX_IMAGE_PIXELS" in str(err) else DatasetError(
            f"{path} cannot be decoded as an image: {err}") from err
    finally:
        cv2.utils.logging.setLogLevel(level)
    if array is None:
        hint = (" (a DICOM file without its 128-byte preamble and 'DICM' header, as old "
                "archives write them? export it again from the archive)"
                if path.suffix.lower() in (".dcm", ".dicom") else "")
        raise DatasetError(f"{path} cannot be decoded as an image (unknown format, corrupt or "
                           f"truncated){hint}: copy or export the file again")
    orientation = _exif_orientation(data) if len(pictures) == 1 else 1
    if orientation != 1:
        array = np.ascontiguousarray(_UPRIGHT[orientation](array))
    if array.ndim == 3:
        if array.shape[-1] == 1:
            return _to_uint8(path, array[..., 0])
        if array.shape[-1] == 4:  # before the bit depth is read from the maximum
            array = _over_black(array)
        if array.shape[-1] != 3:
            raise DatasetError(f"{path} has {array.shape[-1]} channels, expected 1, 3 or 4")
        return cv2.cvtColor(_to_uint8(path, array), cv2.COLOR_BGR2RGB)
    return _to_uint8(path, array)


def _over_black(array: np.ndarray) -> np.ndarray:
    """A four-channel picture's colour composited onto black by its alpha channel: a photograph
    cut out of its surround (or a label drawn on a transparent layer) often keeps colour under
    its transparent pixels, which no viewer shows and the FOV estimate must not see."""
    colour, alpha = array[..., :3], array[..., 3:]
    if not np.issubdtype(array.dtype, np.integer):
        return colour
    top = np.iinfo(array.dtype).max
    if (alpha == top).all():
        return colour
    # black strokes on a (more) transparent layer, whatever colour its pixels keep: a viewer
    # shows the alpha. The black pixels are then more opaque than every other pixel (not so a
    # photograph at half opacity, nor one cut out of its surround)
    black = ~colour.any(axis=-1)
    if black.any() and (black.all() or alpha[~black].max() < alpha[black].max()):
        return np.repeat(alpha, 3, axis=-1)
    # float32: a 16-bit photograph of 20 M pixels would take a gigabyte more in float64
    return np.rint(colour * (alpha / np.float32(top))).astype(array.dtype)


def read_image(path: PathLike, picture: int | None = None) -> np.ndarray:
    """Reads a fundus image as uint8 RGB.

    Handles .tif/.tiff/.jpg/.JPG/.png/.gif/.ppm and their ``.gz`` forms (STARE), and DICOM
    files whatever their names (:func:`_decode_dicom`). GIFs are read with Pillow; a file of
    several pictures (DICOM frames, TIFF pages) is read one ``picture`` at a time (0 first, of
    :func:`picture_count`) and refused without one, an animation refused (:func:`_decode`);
    grayscale files are replicated to three channels; 16-bit files are scaled to 8 bit
    by the bit depth of their data (:func:`bit_depth`: 12-bit data stored in a 16-bit PNG maps
    4095 to 255). A file with an EXIF orientation is turned upright, as viewers show it.

    Args:
        path: the image file.
        picture: which frame or page of a file of several (0 first); 0 or None for a file of
            one picture.

    Returns:
        ``HxWx3`` uint8 RGB array.

    Raises:
        DatasetError: when the file is missing, unreadable, truncated, corrupt (a JPEG whose
            decoder warns) or of an unknown format.
    """
    array = _decode(path, picture=picture)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return array


def is_gray(array: np.ndarray) -> bool:
    """One channel, or three equal ones (a gray picture saved as RGB)."""
    return array.ndim == 2 or bool((array[..., 0] == array[..., 1]).all()
                                   and (array[..., 0] == array[..., 2]).all())


# A colour fundus photograph is red: blue's mean is at most 0.50 of red's in each of the 68 at
# hand (DRIVE, STARE, the CHASE_DB1, HRF, LES-AV and HRF-AV samples), 2.0-35 times it with the
# two swapped (bench/channel_order.py).
BLUE_OVER_RED = 1.0


def blue_over_red(image: np.ndarray) -> float:
    """The mean of the blue channel of an RGB ``image`` over that of its red (the frame, near
    black in both, left in): under :data:`BLUE_OVER_RED` in colour fundus photographs."""
    image = np.asarray(image)
    red = float(image[..., 0].mean(dtype=np.float64))
    return float(image[..., 2].mean(dtype=np.float64)) / max(red, 1e-6)


def channel_order_warning(image: np.ndarray, source: object = "the image") -> str | None:
    """A one-line warning when the blue channel of a colour ``image`` is brighter than its red
    (:func:`blue_over_red` over :data:`BLUE_OVER_RED`), as in no fundus photograph: its
    channels are most likely in OpenCV's BGR order, and the FOV estimate (from the red
    channel) and an artery/vein map go wrong; else None."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or is_gray(image):
        return None
    ratio = blue_over_red(image)
    if ratio <= BLUE_OVER_RED:
        return None
    return (f"warning: {source}: its blue channel is brighter than its red ({ratio:.1f} times), "
            "as in no colour fundus photograph: are its channels in BGR order (OpenCV's)? Swap "
            "them (image[..., ::-1]; cv2.imread gives BGR, retina_tf.data.io.read_image RGB); "
            "as it is, its FOV and artery/vein maps may be wrong")


# Up to this many colours (the background's included), a coloured mask is solid strokes: each
# colour brighter than the darkest is foreground. More are soft edges (antialiasing, JPEG),
# whose levels are refused.
SOLID_COLOURS = 8


def _gray_levels(array: np.ndarray) -> np.ndarray:
    """Collapses a mask to one channel; a coloured mask counts every pixel brighter than its
    darkest colour (vessels drawn in two colours, say red and blue, are both vessel)."""
    if array.ndim == 2:
        return array
    if is_gray(array):
        return array[..., 0]
    brightest = array.max(axis=-1)
    if array.dtype != np.uint8 or array.shape[-1] != 3:
        return brightest
    levels = np.flatnonzero(np.bincount(brightest.ravel(), minlength=256))
    if len(levels) <= 2:  # one colour on another (DRIVE's 2nd_manual: (252, 254, 252) on (4, 2, 4))
        return brightest
    packed = (array[..., 0].astype(np.uint32) << 16 | array[..., 1].astype(np.uint32) << 8
              | array[..., 2])
    if len(np.unique(packed)) > SOLID_COLOURS:
        return brightest
    return np.where(brightest > levels[0], np.uint8(255), np.uint8(0))


# read_image decodes these (and their gzipped forms, as STARE's .ppm.gz)
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".jfif", ".png", ".gif", ".ppm", ".pgm",
                  ".bmp", ".webp", ".dcm", ".dicom")


def read_mask(path: PathLike, what: str = "label") -> np.ndarray:
    """Reads a binary mask (vessel label or FOV mask) as bool.

    Accepts 0/255 and 0/1 files, 1-bit PNGs (CHASE_DB1), palette GIFs (DRIVE ``2nd_manual``
    stores 4/252) and RGB masks with equal channels (HRF ``mask/*.tif``): with two gray levels
    the brighter one is foreground; a file of one level is all foreground when that level is
    above 127 (or is 1), else all background.

    Args:
        path: the mask file.
        what: what the mask is, for messages; ``"fov"`` also accepts masks with a few
            compression-noise levels and thresholds them at > 127.

    Returns:
        ``HxW`` bool array.

    Raises:
        DatasetError: when the file cannot be read or a label has more than two gray levels.
    """
    path = Path(path)
    return mask_of_levels(_gray_levels(_decode(path)), what, path)


def mask_of_levels(gray: np.ndarray, what: str, source: object) -> np.ndarray:
    """A one-channel mask of any numeric type as bool, by :func:`read_mask`'s rules (with
    ``what="fov"``, more than two levels are cut halfway between the darkest and the brightest,
    at > 127 for uint8). ``source`` names the mask in messages."""
    if gray.dtype == bool:
        return gray
    if gray.dtype == np.uint8:
        levels = np.flatnonzero(np.bincount(gray.ravel(), minlength=256))
    else:
        levels = np.unique(gray)
    if len(levels) > 2:
        if what == "fov":
            return gray > (127 if gray.dtype == np.uint8 else (levels[0] + levels[-1]) / 2)
        raise DatasetError(f"{source}: {what} is not binary: found {len(levels)} distinct "
                           f"values (e.g. {levels[:6].tolist()}): save it with two levels in a "
                           "lossless format (PNG, GIF, TIFF; JPEG blurs edges), thresholded "
                           "if it was drawn with soft edges")
    if len(levels) == 2:
        return gray == levels[1]
    level = levels[0].item()
    return np.full(gray.shape, level > 127 or level == 1)


def fov_of_array(mask: np.ndarray, source: object) -> np.ndarray:
    """A FOV mask given as an array (bool, 0/1, 0/255, 4/252; one channel or three) as bool,
    by the rules of :func:`read_fov_mask`, so that a mask gives the same FOV as its file."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 4:
        raise DatasetError(f"the FOV mask given for {source} has four channels: give one "
                           "(mask[..., 0], or mask[..., 3] if the alpha channel holds the FOV)")
    if mask.ndim == 3:
        mask = _gray_levels(mask)
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.number)):
        raise DatasetError(f"the FOV mask given for {source} is of type {mask.dtype}: give "
                           "bool, 0/1 or 0/255 numbers")
    return _nonempty(mask_of_levels(mask, "fov", source), source)


def _nonempty(fov: np.ndarray, source: object) -> np.ndarray:
    """Refuses a FOV with no pixel (a 0/1 mask saved as JPEG has nothing above 127): every
    metric and patch would come from nothing."""
    if not fov.any():
        raise DatasetError(f"{source}: the FOV mask is empty: save it with 255 (white) inside "
                           "the field of view and 0 outside")
    return fov


def read_fov_mask(path: PathLike) -> np.ndarray:
    """:func:`read_mask` of a FOV mask, refusing one with no FOV pixel."""
    return _nonempty(read_mask(path, "fov"), path)


def read_av(path: PathLike, av_format: str) -> np.ndarray:
    """Reads an artery/vein label file as ``HxWx3`` bool (artery, vein, vessel).

    Args:
        path: the A/V file.
        av_format: ``"rgb"`` (RITE, LES-AV, synthetic: red artery, blue vein, green crossing,
            white uncertain) or ``"index"`` (HRF-AV: 0 background, 1 artery, 2 vein,
            3 crossing or uncertain); see :mod:`retina_tf.data.av`.

    Raises:
        DatasetError: when the file is unreadable or does not match the format.
    """
    path = Path(path)
    data = _read_bytes(path)
    if data[:3] == b"\xff\xd8\xff":
        raise DatasetError(f"{path}: an A/V label saved as JPEG: its colours shift (dark blue "
                           "veins come out nearer black) and vessel pixels are lost; save the "
                           "label losslessly (PNG, TIFF or GIF)")
    array = _decode(path, data)
    try:
        if av_format == "rgb":
            if is_gray(array):
                if array.any():  # gray levels cannot be red arteries and blue veins
                    raise DatasetError(
                        f"{path}: a gray A/V label, but this layout's A/V maps are colour (red "
                        "artery, blue vein, green crossing, white uncertain); an index map (0, "
                        "1 artery, 2 vein, 3 crossing or uncertain) goes in the HRF-AV layout")
                array = np.zeros((*array.shape[:2], 3), array.dtype)
            return av_lib.decode_av_rgb(array)
        if av_format == "index":
            if array.ndim == 3:
                array = _gray_levels(array)
            return av_lib.decode_av_index(array)
    except ValueError as err:
        raise DatasetError(f"{path}: {err}") from err
    raise DatasetError(f"{path}: unknown A/V format {av_format!r}; expected 'rgb' or 'index'")


def _encode(path: Path, array: np.ndarray) -> bytes:
    name = path.name.lower()
    compress = name.endswith(".gz")
    if compress:
        name = name[:-3]
    ext = os.path.splitext(name)[1]
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3
                                                                and array.shape[-1] != 3):
        raise DatasetError(f"{path}: can only write HxW or HxWx3 uint8/bool arrays, got shape "
                           f"{array.shape} dtype {array.dtype}")
    if ext == ".gif":
        buffer = io.BytesIO()
        # A gray array keeps its exact levels in a GIF (Pillow writes a grayscale palette).
        Image.fromarray(array).save(buffer, format="GIF")
        data = buffer.getvalue()
    else:
        if array.ndim == 2 and ext == ".ppm":
            array = np.repeat(array[..., None], 3, axis=-1)  # PPM is always three-channel
        bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if array.ndim == 3 else array
        ok, encoded = cv2.imencode(ext or ".png", bgr)
        if not ok:
            raise DatasetError(f"{path}: OpenCV cannot encode the extension {ext!r}")
        data = encoded.tobytes()
    return gzip.compress(data, mtime=0) if compress else data


def write_image_atomic(path: PathLike, array: np.ndarray) -> None:
    """Writes an image or mask so that readers never see a half-written file.

    The file is encoded in memory (format from the extension; ``.gif`` via Pillow, ``.gz``
    compressed), written to a temporary name in the same folder and moved into place with
    ``os.replace``. Bool masks are written as 0/255; missing parent folders are created.

    Args:
        path: the destination file.
        array: ``HxW`` or ``HxWx3`` (RGB) uint8 or bool array.

    Raises:
        DatasetError: for an array or extension that cannot be written.
    """
    path = Path(path)
    atomic_write_bytes(path, _encode(path, array))


def pixel_digest(image: np.ndarray) -> str:
    """A short hash of a photograph's pixels (and size): the same photograph under another
    name, or converted to another lossless format, has the same one."""
    image = np.ascontiguousarray(image)
    return hashlib.sha1(repr(image.shape).encode() + image.tobytes()).hexdigest()[:16]


def file_stem(path: PathLike) -> str:
    """The file name without its image extension, a ``.gz`` counted with it
    (``im0001.ppm.gz`` -> ``im0001``)."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return name.rsplit(".", 1)[0]


def fsync_dir(folder: PathLike) -> None:
    """Makes a rename in ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """``.<name>.<pid>-<hex>.tmp`` beside ``path``: this process's temporary for it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` durably and atomically: to a temporary name beside ``path``, flushed to
    disk (fsync), then renamed into place, so a kill or power loss leaves either the old file or
    the new one, never a half-written file. The file gets the usual permissions (0666 less the
    umask).

    Raises:
        OutputError: when the folder cannot be written (no space, no permission); it names
            ``path``, and the old file, if any, is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(err.errno, err.strerror, str(path)) from err
    # Named before it is made: Ctrl-C or SIGTERM at any moment, even inside the open, still
    # finds it to remove (mkstemp's name arrives only once the file exists); the process id
    # lets clear_killed_writes tell a killed writer's leftover from a live one's file.
    tmp_name = temporary_name(path)
    try:
        handle = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
        fsync_dir(path.parent)
    except BaseException as err:
        if not isinstance(err, FileExistsError):  # (that one is somebody else's file)
            tmp_name.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(err.errno, err.strerror, str(path)) from err
        raise


def process_exists(pid: int) -> bool:
    """True while a process of that id runs (signal 0 tests without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_killed_writes(folder: PathLike, name: str | None = None) -> None:
    """Clears what writes into ``folder`` by :func:`atomic_write_bytes` and
    :func:`atomic_folder` (of ``name`` alone, when given) left when their process was killed
    (``kill -9``, out of memory), where no ``finally`` runs: temporary files and folders are
    deleted, and a folder set aside by a process that died between its two renames is put
    back. Those of live processes (another command writing) are left alone."""
    folder = Path(folder)
    pattern = f".{glob.escape(name)}.*-*" if name is not None else ".*.*-*"
    for left in sorted(folder.glob(pattern)):
        target, _, pid = left.stem[1:].rpartition(".")  # .<target>.<pid>-<hex>.tmp|.old
        pid = pid.partition("-")[0]
        if (left.suffix not in (".tmp", ".old") or not target or name not in (None, target)
                or not pid.isdigit() or process_exists(int(pid))):
            continue
        with contextlib.suppress(OSError):
            if left.suffix == ".old" and not os.path.lexists(folder / target):
                left.rename(folder / target)
            elif left.is_dir() and not left.is_symlink():
                shutil.rmtree(left)
            else:
                left.unlink()


# An output folder's files are written into a hidden folder inside it, then moved in
# (retina_tf.evaluation.OutputFolder.all_or_nothing)
STAGING_PREFIX = ".retina_tf_staging-"  # + the writing process's id
STAGED_WHOLE = ".whole"  # in a staging folder: its files are complete, to be moved in


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two folders in one step (Linux's ``renameat2`` with ``RENAME_EXCHANGE``): no
    moment without either, as between two renames, where a kill left the old one under a
    hidden name. False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_folder(path: PathLike):
    """Yields a new, empty temporary folder beside ``path`` to fill. When the block ends without
    an error, its files are flushed to disk and it is renamed to ``path`` (what was there is set
    aside until the new folder is in place, then deleted); on an error, Ctrl-C or SIGTERM it is
    deleted. So ``path`` is at every moment what it was before or the whole new folder.

    Raises:
        OutputError: when the folder cannot be made or put in place; it names the path.
    """
    path = Path(path)
    clear_killed_writes(path.parent, path.name)
    # Named before it is made (as atomic_write_bytes's file): Ctrl-C or SIGTERM at any moment,
    # even just after the mkdir, still finds it to remove (mkdtemp's name comes only later).
    tmp: Path | None = temporary_name(path)
    old = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.mkdir()  # 0777 less the umask
            except FileExistsError:
                tmp = None  # somebody else's
                raise
        except OSError as err:
            raise OutputError(err.errno, err.strerror, str(path)) from err
        yield tmp
        try:
            for file in [p for p in tmp.rglob("*") if p.is_file()]:
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            if path.is_dir() and not path.is_symlink() and _exchange(tmp, path):
                old, tmp = tmp, None  # one step: the old folder is where the new one was made
            else:
                if os.path.lexists(path):
                    old = tmp.with_suffix(".old")
                    path.rename(old)
                tmp.rename(path)
            fsync_dir(path.parent)
        except OSError as err:
            raise OutputError(err.errno, err.strerror, str(path)) from err
        if old is not None and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink(missing_ok=True)
    finally:
        if old is not None and os.path.lexists(old) and not os.path.lexists(path):
            # stopped between the two renames: the old one goes back
            with contextlib.suppress(OSError):
                old.rename(path)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass
class SampleData:
    """One decoded sample.

    Attributes:
        name: the sample name (e.g. ``"21_training"``).
        image: ``HxWx3`` uint8 RGB.
        vessel: ``HxW`` bool vessel label, or None when the dataset has none.
        fov: ``HxW`` bool field of view (official mask, the user's, or estimated).
        av: ``HxWx3`` bool (artery, vein, vessel), or None when the dataset has no A/V label.
        fov_estimated: True when ``fov`` came from :func:`retina_tf.data.fov.estimate_fov`.
    """

    name: str
    image: np.ndarray
    vessel: np.ndarray | None
    fov: np.ndarray
    av: np.ndarray | None
    fov_estimated: bool


def _check_size(image_path: Path, image: np.ndarray, other_path: Path, other: np.ndarray,
                what: str) -> None:
    if other.shape[:2] != image.shape[:2]:
        raise DatasetError(f"{what} {other_path} is {other.shape[1]}x{other.shape[0]} but image "
                           f"{image_path} is {image.shape[1]}x{image.shape[0]} (width x height)")


# Vessels cover 8-15 % of a fundus photograph's field of view (DRIVE, STARE, CHASE_DB1, HRF); a
# label marking over half of it as vessel has its levels the wrong way round.
MAX_VESSEL_SHARE = 0.5


def read_sample(sample: Sample, fov_path: PathLike | None = None) -> SampleData:
    """Reads a catalog sample: image, vessel label, field of view and A/V label.

    The FOV comes from ``fov_path`` when given, else from the dataset's mask, else it is
    estimated. Datasets with only an A/V map (HRF-AV) get their vessel label from it.

    Args:
        sample: a record from :func:`retina_tf.data.catalog.list_samples`.
        fov_path: optional FOV mask that overrides the dataset's own (or the estimate).

    Returns:
        :class:`SampleData`.

    Raises:
        DatasetError: when a file is unreadable, a label is not binary or marks over half the
            field of view as vessel (inverted), or a label, mask or A/V map differs in size from
            the image (the message names both files and sizes).
    """
    image_path = Path(sample.image)
    image = read_image(image_path)

    vessel = None
    if sample.label is not None:
        vessel = read_mask(sample.label, "vessel label")
        _check_size(image_path, image, Path(sample.label), vessel, "vessel label")

    av = None
    if sample.av is not None:
        av = read_av(sample.av, sample.av_format or "rgb")
        _check_size(image_path, image, Path(sample.av), av, "A/V label")
        if vessel is None:
            vessel = av[..., 2].copy()

    mask_path = Path(fov_path) if fov_path is not None else sample.fov
    if mask_path is not None:
        fov = read_fov_mask(mask_path)
        _check_size(image_path, image, Path(mask_path), fov, "FOV mask")
        fov_estimated = False
        warning = given_fov_warning(image, fov, str(mask_path))
        if warning:
            log.warning(warning)
    else:
        fov = estimate_fov(image)
        fov_estimated = True
    if vessel is not None:
        share = vessel[fov].mean()
        if vessel.all():  # one level over 127: inverting it would leave no vessel either
            raise DatasetError(f"{sample.label or sample.av}: vessel everywhere (one level, "
                               "white): a label draws vessels white on black; check that it is "
                               "this photograph's label")
        if share > MAX_VESSEL_SHARE:
            raise DatasetError(f"{sample.label or sample.av}: marks {share:.0%} of the field of "
                               "view as vessel: vessels must be the brighter of its two levels "
                               "(white on black); invert the label")
        if share == 0:  # an all-black file: scored F1 0, or taught as "no vessel here"
            log.warning(f"warning: {sample.label or sample.av}: no vessel pixel inside the "
                        "field of view: check that it is this photograph's label, vessels "
                        "white on black")
    return SampleData(name=sample.name, image=image, vessel=vessel, fov=fov, av=av,
                      fov_estimated=fov_estimated)
