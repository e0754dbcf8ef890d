"""DICOM ophthalmic photographs written for the tests, as fundus cameras export them."""

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, generate_uid


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits: int = 8,
                jpeg: bool = False, j2k: bool = False, frames: int = 1, transfer_syntax=None,
                more: tuple = ()) -> Path:
    """A DICOM ophthalmic photograph as cameras export it: raw pixels, a JPEG (Pillow's
    YCbCr, as DICOM's YBR_FULL_422 says) encapsulated as JPEG Baseline, or a lossless JPEG 2000
    (YBR_RCT: its reversible colour transform). A multi-frame file holds ``frames`` copies of
    ``pixels``, or ``pixels`` then the pictures of ``more`` (bytes there: a frame's encoded data
    as it is, for a broken one)."""
    pictures = [pixels, *more] if more else [pixels] * frames
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = transfer_syntax or (JPEGBaseline8Bit if jpeg else JPEG2000Lossless
                                                 if j2k else ExplicitVRLittleEndian)
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # ophthalmic photography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Modality = "OP"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    if len(pictures) > 1:
        ds.NumberOfFrames = len(pictures)
    if jpeg or j2k or transfer_syntax:
        encoded = []
        for picture in pictures:
            if isinstance(picture, bytes):
                encoded.append(picture)
                continue
            buffer = io.BytesIO()
            if j2k:
                Image.fromarray(picture).save(buffer, "JPEG2000", irreversible=False,
                                              no_jp2=True, mct=1)
            else:
                Image.fromarray(picture).save(buffer, "JPEG", quality=95)
            encoded.append(buffer.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.concatenate([p.ravel() for p in pictures]).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
