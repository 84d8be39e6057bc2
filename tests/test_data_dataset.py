"""ImageDataset + collate_skip_bad: bad images are dropped from the batch and reported, never fatal."""
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnnbench.data.dataset import BadImage, ImageDataset, collate_skip_bad
from cnnbench.data.folder import Sample
from cnnbench.data.spec import spec_for_crop
from cnnbench.data.crops import eval_transform


def _samples(tmp_path):
    samples = []
    for i in range(6):
        path = tmp_path / f"good{i}.png"
        Image.new("RGB", (12, 10), (i * 40, 0, 0)).save(path)
        samples.append(Sample(str(path), i % 3))
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((tmp_path / "good0.png").read_bytes()[:40])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    samples.insert(2, Sample(str(truncated), 1))
    samples.insert(5, Sample(str(text), 2))
    samples.append(Sample(str(tmp_path / "gone.jpg"), 0))
    return samples


def test_dataset_items(tmp_path):
    samples = _samples(tmp_path)
    dataset = ImageDataset(samples, eval_transform(spec_for_crop(8), 1))
    assert len(dataset) == 9
    x, label, index = dataset[0]
    assert x.shape == (3, 8, 8) and label == 0 and index == 0
    bad = dataset[8]
    assert isinstance(bad, BadImage) and bad.index == 8 and bad.reason == "file not found"
    assert bad.path == samples[8].path


def test_dataloader_skips_bad_images_and_reports_them(tmp_path):
    samples = _samples(tmp_path)
    dataset = ImageDataset(samples, eval_transform(spec_for_crop(8), 10))
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=0, collate_fn=collate_skip_bad)
    seen_indices, reported = [], []
    for images, labels, indices, bad in loader:
        if images is None:  # the last batch holds only the missing file
            assert len(indices) == 0
        else:
            assert images.shape == (len(indices), 10, 3, 8, 8)
        assert labels.tolist() == [samples[i].label for i in indices.tolist()]
        seen_indices += indices.tolist()
        reported += bad
    assert seen_indices == [0, 1, 3, 4, 6, 7]
    assert len(loader) == 3
    assert [path for path, _ in reported] == [samples[2].path, samples[5].path, samples[8].path]
    reasons = [reason for _, reason in reported]
    assert "truncated" in reasons[0] or "damaged" in reasons[0]
    assert "not an image file" in reasons[1] and reasons[2] == "file not found"


def test_a_batch_of_only_bad_images(tmp_path):
    bad = [BadImage(str(tmp_path / "a.jpg"), "file not found", 0)]
    images, labels, indices, reported = collate_skip_bad(bad)
    assert images is None and labels.numel() == 0 and indices.numel() == 0 and indices.dtype == torch.int64
    assert reported == [(str(tmp_path / "a.jpg"), "file not found")]
