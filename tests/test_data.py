"""Data loading: every reader (PNG gray/RGB/16-bit, JPEG, DICOM with and without a window, NIfTI),
Preprocess for 1- and 3-channel models, read errors naming the file, the labelled collections on
small synthetic CSVs/folders in tmp (never the shared data), and the bundled samples."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from medcam_fast import data
from medcam_fast.data import ImageReadError, Preprocess, read_image, read_mask
from medcam_fast.data.datasets import BRAIN_CLASSES


def ramp(h=24, w=32, lo=0, hi=255, dtype=np.uint8):
    return np.linspace(lo, hi, h * w).reshape(h, w).astype(dtype)


# ----------------------------------------------------------------------------------------------- PNG / JPEG
def test_png_gray_exact(tmp_path):
    a = ramp()
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (24, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, a / 255.0, atol=1e-6)


def test_png_rgb(tmp_path):
    a = np.stack([ramp(), ramp()[::-1], np.full((24, 32), 128, np.uint8)], -1)
    Image.fromarray(a, "RGB").save(tmp_path / "c.png")
    out = read_image(tmp_path / "c.png")
    assert out.shape == (24, 32, 3)
    np.testing.assert_allclose(out, a / 255.0, atol=1e-6)


def test_png_rgb_that_is_gray_and_rgba(tmp_path):
    g = ramp()
    Image.fromarray(np.stack([g] * 3 + [np.full_like(g, 255)], -1), "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (24, 32, 3)           # RGBA drops alpha
    np.testing.assert_allclose(out[..., 0], g / 255.0, atol=1e-6)
    Image.fromarray(g, "L").convert("P").save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (24, 32)   # a gray palette image stays 2-D


def test_jpeg_gray_and_rgb(tmp_path):
    g = ramp()
    Image.fromarray(g, "L").save(tmp_path / "g.jpg", quality=95)
    out = read_image(tmp_path / "g.jpg")
    assert out.shape == (24, 32) and 0.0 <= out.min() and out.max() <= 1.0
    assert np.abs(out - g / 255.0).mean() < 0.02
    Image.fromarray(np.stack([g] * 3, -1) // 2, "RGB").save(tmp_path / "c.jpeg", quality=95)
    out = read_image(tmp_path / "c.jpeg")
    assert out.ndim in (2, 3) and out.shape[:2] == (24, 32)


def test_png_16bit_keeps_its_precision(tmp_path):
    a = ramp(lo=1000, hi=61000, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.shape == (24, 32) and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0                        # min-max scaled
    np.testing.assert_allclose(out, (a - 1000.0) / 60000.0, atol=1e-5)
    assert len(np.unique(out)) > 256                                    # not squeezed through 8 bits


def test_read_mask(tmp_path):
    m = np.zeros((24, 32), np.uint8)
    m[5:10, 3:9] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == bool and out.sum() == 30


# ------------------------------------------------------------------------------------------------------ DICOM
def write_dicom(path, pixels, window=None, photometric="MONOCHROME2", rescale=None):
    import pydicom  # noqa: F401  (pinned in requirements.txt: fails, never skips)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


@pytest.fixture
def ct_ramp():
    return ramp(32, 32, 0, 4000, np.uint16)          # 12-bit values 0..4000


def test_dicom_without_window_is_minmax(tmp_path, ct_ramp):
    out = read_image(write_dicom(tmp_path / "a.dcm", ct_ramp))
    assert out.shape == (32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, ct_ramp / 4000.0, atol=1e-5)


def test_dicom_window_is_applied(tmp_path, ct_ramp):
    out = read_image(write_dicom(tmp_path / "w.dcm", ct_ramp, window=(2000, 1000)))
    assert out.shape == (32, 32)
    assert (out[ct_ramp < 1490] == 0).all() and (out[ct_ramp > 2510] == 1).all()   # clipped outside the window
    mid = np.abs(ct_ramp.astype(float) - 2000).argmin()
    assert abs(out.flat[mid] - 0.5) < 0.01
    inside = (ct_ramp > 1600) & (ct_ramp < 2400)
    np.testing.assert_allclose(out[inside], (ct_ramp[inside] - 1500.0) / 1000.0, atol=2e-3)   # linear inside


def test_dicom_window_not_stretched_to_the_image(tmp_path):
    """An image that fills only part of its window keeps that part of the grey range (no min-max stretch)."""
    px = ramp(16, 16, 1900, 2100, np.uint16)
    out = read_image(write_dicom(tmp_path / "n.dcm", px, window=(2000, 1000)))
    assert 0.38 < out.min() < 0.42 and 0.58 < out.max() < 0.62


def test_dicom_window_after_rescale(tmp_path):
    """CT: stored values + intercept -1024 are HU; a soft-tissue window (40, 400) is in HU."""
    hu = np.array([[-1000, -160, 40], [240, 1000, 40]])
    out = read_image(write_dicom(tmp_path / "ct.dcm", (hu + 1024).astype(np.uint16), window=(40, 400),
                                 rescale=(1, -1024)))
    assert out[0, 0] == 0 and out[1, 1] == 1
    assert abs(out[0, 2] - 0.5) < 0.01 and out[0, 1] < 0.01 and out[1, 0] > 0.99


def test_dicom_monochrome1_is_inverted(tmp_path, ct_ramp):
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", ct_ramp))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", ct_ramp, photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    w1 = read_image(write_dicom(tmp_path / "w1.dcm", ct_ramp, window=(2000, 1000), photometric="MONOCHROME1"))
    assert w1[ct_ramp < 1490].min() == 1.0 and w1[ct_ramp > 2510].max() == 0.0


# ------------------------------------------------------------------------------------------------------ NIfTI
@pytest.fixture
def nifti(tmp_path):
    """A 20x24x5 volume; slice k has its brightest voxel at (k+1, 2k+1)."""
    import nibabel as nib
    vol = np.zeros((20, 24, 5), np.float32)
    for k in range(5):
        vol[:, :, k] = np.linspace(0, 1, 20 * 24).reshape(20, 24) * 10
        vol[k + 1, 2 * k + 1, k] = 100.0
    path = tmp_path / "v.nii.gz"
    nib.Nifti1Image(vol, np.eye(4)).to_filename(str(path))
    return path


def test_nifti_middle_slice_by_default(nifti):
    out = read_image(nifti)
    assert out.shape == (20, 24) and out.dtype == np.float32
    assert np.unravel_index(out.argmax(), out.shape) == (3, 5) and out.max() == 1.0 and out.min() == 0.0


def test_nifti_chosen_slice(nifti):
    out = read_image(nifti, slice_index=4)
    assert np.unravel_index(out.argmax(), out.shape) == (5, 9)


def test_nifti_slice_out_of_range(nifti):
    with pytest.raises(ImageReadError, match=r"slice 5 is outside 0\.\.4") as err:
        read_image(nifti, slice_index=5)
    assert "v.nii.gz" in str(err.value)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", ["bad.png", "bad.jpg", "bad.dcm", "bad.nii.gz", "bad.nii"])
def test_corrupt_file_names_the_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageReadError) as err:
        read_image(p)
    assert str(p) in str(err.value) and err.value.path == str(p)
    assert isinstance(err.value, ValueError)


def test_truncated_png_names_the_file(tmp_path):
    p = tmp_path / "cut.png"
    Image.fromarray(ramp()).save(p)
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image(p)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ImageReadError, match="no such file") as err:
        read_image(tmp_path / "nope.png")
    assert "nope.png" in str(err.value)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="unknown image type"):
        read_image(tmp_path / "x.txt")
    with pytest.raises(ImageReadError, match="nope.png"):
        Preprocess((8, 8), (0.0,), (1.0,))(tmp_path / "nope.png")


# ------------------------------------------------------------------------------------------------ Preprocess
def test_preprocess_gray_model_from_rgb(tmp_path):
    a = np.zeros((40, 30, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 30, 60, 90
    Image.fromarray(a, "RGB").save(tmp_path / "c.png")
    pre = Preprocess((16, 12), (0.2,), (0.5,))
    unit = pre.to_unit(tmp_path / "c.png")
    assert unit.shape == (1, 16, 12) and pre.in_chans == 1
    torch.testing.assert_close(unit, torch.full((1, 16, 12), 60 / 255), atol=1e-5, rtol=0)
    x = pre(tmp_path / "c.png")
    torch.testing.assert_close(x, (unit - 0.2) / 0.5)
    torch.testing.assert_close(pre.denormalise(x), unit, atol=1e-6, rtol=0)


def test_preprocess_rgb_model_from_gray(tmp_path):
    Image.fromarray(ramp(), "L").save(tmp_path / "g.png")
    pre = Preprocess((8, 8), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    unit = pre.to_unit(tmp_path / "g.png")
    assert unit.shape == (3, 8, 8)
    torch.testing.assert_close(unit[0], unit[1])
    torch.testing.assert_close(unit[1], unit[2])
    x = pre(tmp_path / "g.png")
    torch.testing.assert_close(x[2], (unit[2] - 0.406) / 0.225)
    assert 0.0 <= float(unit.min()) and float(unit.max()) <= 1.0


def test_preprocess_normalisation_value():
    pre = Preprocess((4, 4), (0.5,), (0.25,))
    x = pre(np.full((10, 10), 0.75, np.float32))
    torch.testing.assert_close(x, torch.ones(1, 4, 4))


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK", "YCbCr"])
def test_preprocess_pil_8bit_modes_agree(mode):
    """Every 8-bit PIL mode gives the same [0,1] image (LA/CMYK/YCbCr used to come out unscaled, saturated)."""
    g = Image.fromarray(ramp(16, 16, 0, 200), "L")
    pre = Preprocess((16, 16), (0.0,), (1.0,))
    ref = pre.to_unit(g)
    torch.testing.assert_close(pre.to_unit(g.convert(mode)), ref, atol=2 / 255, rtol=0)
    assert float(ref.max()) == pytest.approx(200 / 255, abs=1e-5)


def test_preprocess_16bit_pil_and_array():
    a = ramp(16, 16, 0, 60000, np.uint16)
    pre = Preprocess((16, 16), (0.0,), (1.0,))
    for src in (Image.fromarray(a), a):
        unit = pre.to_unit(src)
        assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
        assert abs(float(unit.mean()) - 0.5) < 0.01            # not saturated at 1
    with pytest.raises(ValueError, match="cannot preprocess"):
        pre.to_unit([1, 2, 3])


def test_preprocess_from_timm_model():
    import timm
    m = timm.create_model("resnet10t", pretrained=False, num_classes=3,
                          pretrained_cfg_overlay={"input_size": (1, 48, 40), "mean": (0.3,), "std": (0.2,)})
    pre = Preprocess.from_model(m)
    assert pre.input_size == (48, 40) and pre.mean == (0.3,) and pre.std == (0.2,)


# ------------------------------------------------------------------------------------------------ collections
def test_folder_dataset(tmp_path):
    for cls, n in (("benign", 2), ("malignant", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(ramp()).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "benign" / "notes.txt").write_text("not an image")
    samples, names = data.folder_dataset(tmp_path)
    assert names == ["benign", "malignant"]
    assert [(s.label, s.name, s.class_name) for s in samples] == [
        (0, "benign/0", "benign"), (0, "benign/1", "benign"), (1, "malignant/0", "malignant")]
    samples, names = data.folder_dataset(tmp_path, ["malignant", "benign"])
    assert names == ["malignant", "benign"] and samples[0].label == 0 and samples[0].class_name == "malignant"
    with pytest.raises(ValueError, match="no subfolder"):
        data.folder_dataset(tmp_path, ["benign", "other"])
    with pytest.raises(ValueError, match="not a folder"):
        data.folder_dataset(tmp_path / "nope")


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_brain_mri_csv(tmp_path):
    write_csv(tmp_path / "split.csv", ["id", "label", "split", "image", "mask"], [
        [1, "glioma", "train", "images/glioma/1.jpg", "masks/glioma/1.png"],
        [2, "pituitary", "test", "images/pituitary/2.jpg", "masks/pituitary/2.png"],
        [3, "meningioma", "test", "images/meningioma/3.jpg", ""],
    ])
    samples, names = data.brain_mri(tmp_path)
    assert names == BRAIN_CLASSES and len(samples) == 3
    assert [s.label for s in samples] == [0, 2, 1] and samples[0].name == "brain_1"
    assert samples[0].path == tmp_path / "images/glioma/1.jpg"
    assert samples[0].mask_path == tmp_path / "masks/glioma/1.png" and samples[2].mask_path is None
    test, _ = data.brain_mri(tmp_path, "test")
    assert [s.name for s in test] == ["brain_2", "brain_3"] and {s.split for s in test} == {"test"}
    assert [s.name for s in data.csv_dataset(tmp_path / "split.csv", "test")[0]] == ["brain_2", "brain_3"]


def test_isic2018_csv(tmp_path):
    write_csv(tmp_path / "labels.csv", ["id", "split", "diagnosis", "image", "mask", "task2_attributes"], [
        ["ISIC_1", "train", "NV", "images/ISIC_1.jpg", "masks/ISIC_1.png", "00010"],
        ["ISIC_2", "train", "SK", "images/ISIC_2.jpg", "masks/ISIC_2.png", "00000"],
        ["ISIC_3", "val", "MEL", "images/ISIC_3.jpg", "masks/ISIC_3.png", "10011"],
    ])
    samples, names = data.isic2018(tmp_path)
    assert names == ["NV", "MEL"]
    assert [(s.name, s.label, s.split) for s in samples] == [("ISIC_1", 0, "train"), ("ISIC_3", 1, "val")]
    assert [s.name for s in data.isic2018(tmp_path, "val")[0]] == ["ISIC_3"]
    assert [s.name for s in data.csv_dataset(tmp_path / "labels.csv")[0]] == ["ISIC_1", "ISIC_3"]


def test_csv_errors(tmp_path):
    write_csv(tmp_path / "other.csv", ["a", "b"], [[1, 2]])
    with pytest.raises(ValueError, match="unknown CSV header"):
        data.csv_dataset(tmp_path / "other.csv")
    with pytest.raises(ValueError, match="no CSV"):
        data.brain_mri(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ bundled samples
def test_bundled_samples():
    samples = data.samples()
    assert len(samples) == 8
    assert len({s.name for s in samples}) == 8
    for s in samples:
        assert s.path.is_file() and s.mask_path is not None and s.mask_path.is_file()
        assert s.class_name == BRAIN_CLASSES[s.label]
        img, mask = read_image(s.path), read_mask(s.mask_path)
        assert img.ndim == 2 and mask.shape == img.shape and mask.any()
    assert {s.label for s in samples} == {0, 1, 2}
    assert (data.SAMPLES_DIR / "ATTRIBUTION").read_text().count("CC BY 4.0") >= 1
