import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugmentOp

from pipeline.data.transforms import DeviceAugment, eval_transform, train_transform


def random_image(rng, w=120, h=90):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_posterize_to_zero_bits_gives_black_instead_of_raising():
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)  # 4 - 4 = 0 bits kept
    out = op(Image.new("RGB", (8, 8), (200, 120, 30)))
    assert np.asarray(out).max() == 0


def test_recipe_survives_many_images():
    rng = np.random.default_rng(0)
    t = train_transform(32)
    outs = [t(random_image(rng, int(rng.integers(20, 80)), int(rng.integers(20, 80)))) for _ in range(300)]
    assert all(o.dtype == torch.uint8 and o.shape == (3, 32, 32) for o in outs)


def test_uint8_then_device_normalise_equals_cpu_normalise():
    img = random_image(np.random.default_rng(1))
    on_cpu = eval_transform(64, uint8=False)(img)
    raw = eval_transform(64, uint8=True)(img)
    on_device, labels = DeviceAugment(5, "cpu", training=False)(torch.as_tensor(raw)[None], torch.tensor([3]))
    torch.testing.assert_close(on_device[0], on_cpu, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [3]


def test_eval_transform_center_crops():
    img = Image.new("RGB", (200, 100))
    img.paste((255, 0, 0), (0, 0, 20, 100))  # a red band at the left edge, cropped away by the center crop
    out = eval_transform(64, crop_pct=0.875)(img)
    assert out.shape == (3, 64, 64) and out[0].max() == 0


def test_device_augment_targets():
    torch.manual_seed(0)
    aug = DeviceAugment(10, "cpu", training=True, label_smoothing=0.1)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    x, y = aug(images, torch.tensor([0, 1, 2, 3]))
    assert x.dtype == torch.float32 and y.shape == (4, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(4))
    assert y.min().item() >= 0.01 - 1e-6  # the smoothing floor
    x, y = aug(images[:3], torch.tensor([0, 1, 2]))  # odd batch: label smoothing alone
    torch.testing.assert_close(y[0], torch.tensor([0.91] + [0.01] * 9))
