"""Kohya dataset handling: buckets, repeats/epochs arithmetic, caption order, dataset errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from train_support import make_dataset, shape_image, tiny_config

from lora_trainer.errors import DatasetError
from lora_trainer.train import plan_training
from lora_trainer.train.buckets import BucketSelector, make_bucket_resolutions
from lora_trainer.train.captions import captions_are_static, process_caption
from lora_trainer.train.data import epoch_batches, epoch_repeats, scan_dataset
from lora_trainer.train.engine import prepare_dataset


# ------------------------------------------------------------------ buckets (kohya's algorithm)
def test_bucket_resolutions_match_kohya_by_hand():
    # width w from 256 to 1024 step 64: h = min(1024, (512*512 // w) // 64 * 64), kept if h >= 256.
    resos = make_bucket_resolutions(512, 256, 1024, 64)
    for pair in [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384),
                 (704, 320), (768, 320), (832, 256), (1024, 256), (320, 704), (256, 832)]:
        assert pair in resos
    assert (512, 448) not in resos and (1088, 256) not in resos
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert resos == sorted(resos) and len(resos) == 17


@pytest.mark.parametrize("size, bucket, resized, crop", [
    # aspect 2.0: nearest ratio is 704/320 = 2.2 (vs 640/384 = 1.67); image narrower than the bucket
    # ratio, so widths match: scale 0.704 -> 704x352, 16 px cropped top and bottom.
    ((1000, 500), (704, 320), (704, 352), (16, 0)),
    # aspect 0.75: nearest 448/576 = 0.778; scale 448/300 -> 448x597 (upscaled), crop (597-576)//2 = 10.
    ((300, 400), (448, 576), (448, 597), (10, 0)),
    ((512, 512), (512, 512), (512, 512), (0, 0)),
    # square but larger: downscaled to the square bucket.
    ((800, 800), (512, 512), (512, 512), (0, 0)),
    # aspect 1.5 -> 640/384 = 1.667 (vs 576/448 = 1.286): heights match, scale 384/400 -> 576x384?
    # no: 1.5 < 1.667 so widths match: scale 640/600 -> 640x427, crop (427-384)//2 = 21.
    ((600, 400), (640, 384), (640, 427), (21, 0)),
])
def test_bucket_selection(size, bucket, resized, crop):
    choice = BucketSelector(512).select(*size)
    assert (choice.bucket, choice.resized, choice.crop_top_left) == (bucket, resized, crop)


@pytest.mark.parametrize("size, bucket, resized", [
    ((300, 400), (256, 384), (300, 400)),  # smaller than 512²: never upscaled, bucket rounds down
    # 2000x1000: sqrt(512²·2) = 724 -> 704 wide gives 704/320 = 2.2; 362 high -> 320 gives 640/320 = 2.0
    # exactly, which wins: resized 640x320.
    ((2000, 1000), (640, 320), (640, 320)),
    ((100, 100), (64, 64), (100, 100)),
])
def test_bucket_no_upscale(size, bucket, resized):
    choice = BucketSelector(512, no_upscale=True).select(*size)
    assert (choice.bucket, choice.resized) == (bucket, resized)


def test_bucketing_off_uses_one_square():
    choice = BucketSelector(512, enable=False).select(1000, 500)
    assert choice.bucket == (512, 512) and choice.resized == (1024, 512) and choice.crop_top_left == (0, 256)


# ------------------------------------------------------------------ repeats / epochs / steps
def _two_folders(root: Path) -> Path:
    make_dataset(root, n=3, repeats=2, name="shape")
    make_dataset(root, n=1, repeats=5, name="other")
    return root


def test_plan_arithmetic(tmp_path):
    data = _two_folders(tmp_path / "d")
    plan = plan_training(tiny_config(data, tmp_path / "o", batch_size=2, epochs=3))
    assert plan.num_images == 4 and plan.images_x_repeats == 3 * 2 + 1 * 5 == plan.samples_per_epoch
    assert plan.batches_per_epoch == 6 and plan.steps_per_epoch == 6  # ceil(11 / 2)
    assert plan.epochs == 3 and plan.total_steps == 18
    assert "18 steps" in plan.text() and "2_shape: 3 images × 2 repeats" in plan.text()

    by_steps = plan_training(tiny_config(data, tmp_path / "o", batch_size=2, epochs=0, max_steps=10))
    assert by_steps.total_steps == 10 and by_steps.epochs == 2  # ceil(10 / 6)

    accum = plan_training(tiny_config(data, tmp_path / "o", batch_size=2, gradient_accumulation_steps=4))
    assert accum.steps_per_epoch == 2  # ceil(6 batches / 4)


def test_batches_never_mix_buckets_and_count_per_bucket(tmp_path):
    root = tmp_path / "d"
    make_dataset(root, n=3, repeats=1, sizes=[(64, 64), (64, 64), (128, 32)])
    config = tiny_config(root, tmp_path / "o", batch_size=2)
    dataset, plan = prepare_dataset(config)
    assert plan.buckets == {"128x32": 1, "64x64": 2}
    assert plan.batches_per_epoch == 2  # ceil(2/2) + ceil(1/2): a lone image gets its own batch
    for epoch in range(3):
        batches = epoch_batches(dataset, 2, config.seed, epoch)
        assert sorted(k for b in batches for k in b) == [0, 1, 2]
        assert all(len({dataset.items[k].bucket for k in b}) == 1 for b in batches)
    assert epoch_batches(dataset, 2, 7, 1) == epoch_batches(dataset, 2, 7, 1)  # pure function of (seed, epoch)


def test_regularisation_images_balance_training_samples(tmp_path):
    root = make_dataset(tmp_path / "d", n=3, repeats=2, reg=2)
    dataset = scan_dataset(root)
    counts = epoch_repeats(dataset)
    train = [c for c, i in zip(counts, dataset.items) if not i.is_reg]
    reg = [c for c, i in zip(counts, dataset.items) if i.is_reg]
    # kohya: 6 training samples; 2 reg images (repeats 1) are cycled until they also give 6.
    assert train == [2, 2, 2] and reg == [3, 3]
    plan = plan_training(tiny_config(root, tmp_path / "o"))
    assert plan.reg_x_repeats == 6 and plan.samples_per_epoch == 12 and plan.num_reg_images == 2


# ------------------------------------------------------------------ captions
def test_caption_processing_order_matches_kohya():
    caption = "trigger, red, circle, grey background, simple"
    for seed in range(20):
        ours = process_caption(caption, shuffle=True, keep_tokens=1, caption_dropout_rate=0.3,
                               tag_dropout_rate=0.25, rng=random.Random(seed))
        # kohya's process_caption, step by step, on the same random stream:
        rng = random.Random(seed)
        if rng.random() < 0.3:  # 1. whole-caption dropout first
            expected = ""
        else:
            tokens = [t.strip() for t in caption.split(",")]
            fixed, flex = tokens[:1], tokens[1:]  # 2. keep_tokens stay in front
            rng.shuffle(flex)  # 3. shuffle the rest
            flex = [t for t in flex if rng.random() >= 0.25]  # 4. then tag dropout
            expected = ", ".join(fixed + flex)  # 5. join with ", "
        assert ours == expected
        if ours:
            assert ours.startswith("trigger")


def test_caption_static_when_no_randomness():
    assert process_caption("a, b, c\nsecond line") == "a, b, c"
    assert captions_are_static(False, 0.0, 0.0)
    assert not captions_are_static(True, 0.0, 0.0) and not captions_are_static(False, 0.1, 0.0)


def test_missing_caption_uses_class_tokens_with_warning(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", n=2, captions=False, name="my thing")
    dataset = scan_dataset(root)
    assert [i.caption for i in dataset.items] == ["my thing", "my thing"]
    assert any("no caption" in w for w in dataset.warnings)


def test_caption_extension_fallback(tmp_path):
    root = make_dataset(tmp_path / "d", n=1, captions=False)
    (root / "img" / "2_shape" / "00.caption").write_text("from caption file", encoding="utf-8")
    assert scan_dataset(root).items[0].caption == "from caption file"


# ------------------------------------------------------------------ bad datasets fail fast
def test_empty_folder(tmp_path):
    (tmp_path / "img" / "1_x").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        scan_dataset(tmp_path)


def test_folder_without_repeats_prefix(tmp_path):
    folder = tmp_path / "img" / "mychar"
    folder.mkdir(parents=True)
    shape_image(0).save(folder / "a.png")
    with pytest.raises(DatasetError, match="no <repeats>_ prefix.*10_mychar"):
        scan_dataset(tmp_path)


def test_loose_images_without_folder(tmp_path):
    shape_image(0).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="not inside a <repeats>_<name> folder"):
        scan_dataset(tmp_path)


def test_unreadable_image(tmp_path):
    root = make_dataset(tmp_path / "d", n=1)
    (root / "img" / "2_shape" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match="broken.png"):
        scan_dataset(root)


def test_zero_repeats(tmp_path):
    folder = tmp_path / "img" / "0_x"
    folder.mkdir(parents=True)
    shape_image(0).save(folder / "a.png")
    with pytest.raises(DatasetError, match="0 repeats"):
        scan_dataset(tmp_path)


def test_header_scan_matches_decoded_sizes_with_exif_rotation(tmp_path):
    """plan_training reads headers only; sizes must match the decoded (EXIF-rotated) images."""
    from PIL import Image

    root = make_dataset(tmp_path / "d", n=1, sizes=[(96, 64)])
    rotated = shape_image(1, (96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated.save(root / "img" / "2_shape" / "rot.jpg", exif=exif.tobytes())
    decoded = {i.path.name: i.size for i in scan_dataset(root).items}
    header = {i.path.name: i.size for i in scan_dataset(root, decode=False).items}
    assert decoded == header and header["rot.jpg"] == (64, 96) and header["00.png"] == (96, 64)
