"""Building DICOM CT slices in tests: the file meta and UIDs every slice needs, in one place."""

from __future__ import annotations


def ct_slice_dataset(study_uid: str, series_uid: str, frame_uid: str, instance: int):
    """An empty explicit-VR little-endian CT Image Storage dataset with its file meta and UIDs set;
    the caller adds geometry and pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.InstanceNumber = instance
    return ds
