"""VQ-KD (BEiT v2) and DALL-E dVAE encoders: published key layouts, loading, tokens.

Weights are random and tiny (no downloads): each test builds a module, writes its
weights in the release's key layout, loads the file back and compares token ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mapet_ds.tokenizers.dvae import DVAEEncoder, map_pixels
from mapet_ds.tokenizers.vqkd import (
    TokenizerWeightsError,
    VQKDEncoder,
    prepare_images,
    vqkd_published_state_dict,
)

TINY_VQKD = dict(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                 n_codes=64, code_dim=8)
TINY_DVAE = dict(n_hid=8, n_blk_per_group=1, vocab_size=64)


def _scramble(module: nn.Module, seed: int, std: float = 0.5) -> nn.Module:
    """Large random weights, so tokens vary across patches (default init is near-constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _images(b: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def vqkd_model() -> VQKDEncoder:
    return _scramble(VQKDEncoder(**TINY_VQKD), seed=1)


@pytest.fixture(scope="module")
def vqkd_file(vqkd_model, tmp_path_factory):
    """A release-style checkpoint: under "model", with decoder/teacher keys to ignore."""
    state = vqkd_published_state_dict(vqkd_model)
    state["decoder.blocks.0.attn.qkv.weight"] = torch.zeros(3 * 64, 64)
    state["decode_task_layer.0.weight"] = torch.zeros(64, 64)
    state["teacher_model.visual.proj"] = torch.zeros(2, 2)
    state["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    path = tmp_path_factory.mktemp("vqkd") / "vqkd.pth"
    # a training checkpoint also pickles its argparse Namespace and counters
    torch.save({"model": state, "args": argparse.Namespace(lr=1.5e-3), "epoch": 99}, path)
    return path


# ----------------------------------------------------------------------------- VQ-KD
def test_vqkd_key_layout_is_the_release_encoder_half():
    keys = set(VQKDEncoder(**TINY_VQKD).state_dict())
    for k in ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.pos_embed",
              "encoder.blocks.1.attn.qkv.weight", "encoder.blocks.1.attn.q_bias",
              "encoder.blocks.1.attn.v_bias", "encoder.blocks.0.mlp.fc2.bias",
              "encoder.fc_norm.weight", "encode_task_layer.0.weight",
              "encode_task_layer.2.bias", "quantize.embedding.weight"]:
        assert k in keys, k
    assert not any("k_bias" in k or "gamma" in k or k.startswith("encoder.norm.") for k in keys)


def test_vqkd_roundtrip_same_ids(vqkd_model, vqkd_file):
    images = _images(3, 64, 80)
    ids = vqkd_model.tokenize(images)
    assert ids.shape == (3, 196) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    assert ids.unique().numel() > 1  # scrambled weights: tokens differ across patches

    loaded = VQKDEncoder.load(vqkd_file, num_heads=2)
    assert (loaded.vocab_size, loaded.grid, loaded.input_size) == (64, 14, 224)
    assert loaded.config == vqkd_model.config
    assert torch.equal(loaded.tokenize(images), ids)
    spec = loaded.spec()
    assert spec["kind"] == "vqkd" and spec["grid"] == 14 and spec["n_codes"] == 64
    assert len(spec["weights_sha256"]) == 64 and loaded.weights_path == str(vqkd_file)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    loaded.train()
    assert not loaded.training  # frozen


def test_vqkd_float_input_and_exact_size_match_uint8(vqkd_model):
    images = _images(2, 224, 224)
    ids = vqkd_model.tokenize(images)
    assert torch.equal(vqkd_model.tokenize(images.float() / 255.0), ids)


def test_vqkd_quantiser_is_nearest_normalised_code(vqkd_model):
    pixels = prepare_images(_images(2, 224, 224), 224, torch.device("cpu")) * 2 - 1
    with torch.no_grad():
        z = vqkd_model.encode(pixels)                                   # [2, 196, 8]
        ids = vqkd_model.quantize(z)
    codes = F.normalize(vqkd_model.quantize.embedding.weight, dim=-1)   # [64, 8]
    zn = F.normalize(z, dim=-1).reshape(-1, 8)
    # brute force: explicit squared L2 distance to every code
    dist = ((zn[:, None, :] - codes[None, :, :]) ** 2).sum(-1)          # [392, 64]
    assert torch.equal(ids.reshape(-1), dist.argmin(dim=1))
    assert torch.equal(vqkd_model.tokenize(_images(2, 224, 224)), ids)


def _release_vqkd_ids(sd: dict, images: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """The BEiT v2 tokenizer forward written out from its published description:
    [0,1] -> [-1,1]; ViT with q/v biases and exact-softmax attention; fc_norm on patch
    tokens; Linear-Tanh-Linear; L2-normalise; nearest code by squared distance."""
    def ln(x, p):
        return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-6)

    x = images.float() / 127.5 - 1.0
    w = sd["encoder.patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd["encoder.patch_embed.proj.bias"], stride=w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["encoder.cls_token"].expand(len(x), -1, -1), x], 1) + sd["encoder.pos_embed"]
    for i in range(depth):
        p = f"encoder.blocks.{i}."
        h = ln(x, p + "norm1")
        b, n, c = h.shape
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(c), sd[p + "attn.v_bias"]])
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], bias).reshape(b, n, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear((attn @ v).transpose(1, 2).reshape(b, n, c),
                         sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    t = ln(x[:, 1:], "encoder.fc_norm")
    t = torch.tanh(F.linear(t, sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"]))
    z = F.linear(t, sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"])
    z = F.normalize(z, dim=-1)
    e = sd["quantize.embedding.weight"]
    d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
    return d.argmin(-1)


def test_vqkd_matches_release_forward_written_out():
    model = _scramble(VQKDEncoder(**TINY_VQKD), seed=3, std=0.1)
    with torch.no_grad():  # released codebooks are unit-norm (EMA renormalises them)
        model.quantize.embedding.weight.copy_(F.normalize(model.quantize.embedding.weight, dim=-1))
    images = _images(2, 224, 224)
    with torch.no_grad():
        expected = _release_vqkd_ids(model.state_dict(), images, depth=2, heads=2)
    ids = model.tokenize(images)
    assert ids.unique().numel() > 1 and torch.equal(ids, expected)


def test_vqkd_ignores_outer_autocast_and_amp_runs(vqkd_model):
    images = _images(2, 224, 224)
    ids = vqkd_model.tokenize(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vqkd_model.tokenize(images), ids)
    amp = VQKDEncoder(**TINY_VQKD, amp=True)
    amp.load_state_dict(vqkd_model.state_dict())
    out = amp.tokenize(images)  # amp only acts on CUDA; must run anywhere
    assert out.shape == (2, 196) and out.dtype == torch.int64


def test_vqkd_missing_and_renamed_keys_give_one_clear_error(vqkd_model, tmp_path):
    state = vqkd_published_state_dict(vqkd_model)
    del state["encoder.fc_norm.weight"]
    state["encoder.blocks.0.attn.qkv.weightX"] = state.pop("encoder.blocks.0.attn.qkv.weight")
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(TokenizerWeightsError) as err:
        VQKDEncoder.load(path, num_heads=2)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "BEiT v2" in msg
    assert "2 missing key(s)" in msg and "encoder.fc_norm.weight" in msg
    assert "encoder.blocks.0.attn.qkv.weight" in msg
    assert "1 unexpected key(s): encoder.blocks.0.attn.qkv.weightX" in msg


def test_vqkd_shape_mismatch_and_bad_files(vqkd_model, tmp_path):
    state = vqkd_published_state_dict(vqkd_model)
    state["encode_task_layer.0.bias"] = torch.zeros(5)
    torch.save(state, tmp_path / "shape.pth")  # also: a bare state dict (no "model")
    mismatch = r"encode_task_layer\.0\.bias \(5,\) vs \(64,\)"
    with pytest.raises(TokenizerWeightsError, match=mismatch):
        VQKDEncoder.load(tmp_path / "shape.pth", num_heads=2)

    with pytest.raises(TokenizerWeightsError, match="not found"):
        VQKDEncoder.load(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(TokenizerWeightsError, match="cannot read VQ-KD weights"):
        VQKDEncoder.load(tmp_path / "junk.pth")
    state["quantize.embedding.initted"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "uninit.pth")
    with pytest.raises(TokenizerWeightsError, match="never initialised"):
        VQKDEncoder.load(tmp_path / "uninit.pth")


def test_bad_images_are_refused(vqkd_model):
    with pytest.raises(ValueError, match=r"images: expected an RGB tensor \[B, 3, H, W\]"):
        vqkd_model.tokenize(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        vqkd_model.tokenize(torch.full((1, 3, 32, 32), 200.0))
    with pytest.raises(ValueError, match="uint8 or float"):
        vqkd_model.tokenize(torch.zeros(1, 3, 32, 32, dtype=torch.int32))


# ----------------------------------------------------------------------------- dVAE
@pytest.fixture(scope="module")
def dvae_model() -> DVAEEncoder:
    return _scramble(DVAEEncoder(**TINY_DVAE), seed=2, std=0.3)


def test_dvae_key_layout():
    keys = set(DVAEEncoder(**TINY_DVAE).state_dict())
    assert {"blocks.input.w", "blocks.input.b", "blocks.output.conv.w",
            "blocks.group_1.block_1.res_path.conv_1.w", "blocks.group_1.block_1.res_path.conv_4.b",
            "blocks.group_2.block_1.id_path.w", "blocks.group_4.block_1.id_path.b"} <= keys
    # group_1's first block keeps its width: no id_path conv there
    assert not any(k.startswith("blocks.group_1.block_1.id_path") for k in keys)


def test_dvae_roundtrip_same_ids(dvae_model, tmp_path):
    images = _images(3, 64, 48)
    ids = dvae_model.tokenize(images)
    assert ids.shape == (3, 196) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 64 and ids.unique().numel() > 1

    torch.save(dvae_model.state_dict(), tmp_path / "dvae.pth")
    loaded = DVAEEncoder.load(tmp_path / "dvae.pth")
    assert (loaded.vocab_size, loaded.grid, loaded.input_size) == (64, 14, 112)
    assert loaded.config == dvae_model.config
    assert loaded.spec()["kind"] == "dvae" and loaded.spec()["vocab_size"] == 64
    assert torch.equal(loaded.tokenize(images), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(loaded.tokenize(images), ids)


def test_dvae_token_is_argmax_of_logits(dvae_model):
    images = _images(2, 112, 112)
    x = map_pixels(images.float() / 255.0)
    assert float(x.min()) >= 0.1 - 1e-6 and float(x.max()) <= 0.9 + 1e-6
    with torch.no_grad():
        logits = dvae_model(x)                                   # [2, 64, 14, 14]
    assert logits.shape == (2, 64, 14, 14)
    assert torch.equal(dvae_model.logits(images), logits)
    expected = logits.permute(0, 2, 3, 1).reshape(2, 196, 64).argmax(-1)  # row-major cells
    assert torch.equal(dvae_model.tokenize(images), expected)


def test_dvae_matches_release_forward_written_out(dvae_model):
    """OpenAI's encoder written out: same-padded convs, residual blocks scaled by
    1/n_layers^2, 2x max-pool after groups 1-3, ReLU + 1x1 output conv, argmax."""
    sd = dvae_model.state_dict()

    def conv(x, p):
        w = sd[p + ".w"]
        return F.conv2d(x, w, sd[p + ".b"], padding=(w.shape[-1] - 1) // 2)

    images = _images(2, 112, 112)
    x = conv(0.8 * (images.float() / 255.0) + 0.1, "blocks.input")
    for g in range(1, 5):
        p = f"blocks.group_{g}.block_1."
        r = x
        for j in range(1, 5):
            r = conv(F.relu(r), p + f"res_path.conv_{j}")
        x = (conv(x, p + "id_path") if p + "id_path.w" in sd else x) + r / 4**2
        x = F.max_pool2d(x, 2) if g < 4 else x
    expected = conv(F.relu(x), "blocks.output.conv").argmax(1).flatten(1)
    assert torch.equal(dvae_model.tokenize(images), expected)


def test_dvae_missing_and_renamed_keys_give_one_clear_error(dvae_model, tmp_path):
    state = dict(dvae_model.state_dict())
    del state["blocks.group_3.block_1.res_path.conv_2.b"]
    state["blocks.output.conv.weight"] = state.pop("blocks.output.conv.w")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(TokenizerWeightsError) as err:
        DVAEEncoder.load(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "\n" not in msg and "dVAE" in msg and "encoder.pkl" in msg
    assert "2 missing key(s)" in msg and "blocks.group_3.block_1.res_path.conv_2.b" in msg
    assert "1 unexpected key(s): blocks.output.conv.weight" in msg


def _fake_dall_e() -> dict[str, types.ModuleType]:
    """A stand-in for OpenAI's `dall_e` package, to write an encoder.pkl the way they did
    (torch.save of the whole module). Built independently of DVAEEncoder, following the
    release's structure, so it also cross-checks our key layout."""
    mods = {n: types.ModuleType(n) for n in ("dall_e", "dall_e.encoder", "dall_e.utils")}

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw):
            super().__init__()
            self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, True
            self.device = torch.device("cpu")
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) * 0.3)
            self.b = nn.Parameter(torch.randn(n_out) * 0.3)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers):
            super().__init__()
            self.n_hid, self.post_gain = n_out // 4, 1 / n_layers**2
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            self.res_path = nn.Sequential(OrderedDict([
                ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, self.n_hid, 3)),
                ("relu_2", nn.ReLU()), ("conv_2", Conv2d(self.n_hid, self.n_hid, 3)),
                ("relu_3", nn.ReLU()), ("conv_3", Conv2d(self.n_hid, self.n_hid, 3)),
                ("relu_4", nn.ReLU()), ("conv_4", Conv2d(self.n_hid, n_out, 1))]))

    class Encoder(nn.Module):
        def __init__(self, n_hid=8, n_blk=2, vocab=64):
            super().__init__()
            self.group_count, self.n_hid, self.vocab_size = 4, n_hid, vocab
            w = [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
            groups = [("input", Conv2d(3, n_hid, 7))]
            prev = n_hid
            for g in range(4):
                layers = []
                for j in range(n_blk):
                    layers.append((f"block_{j + 1}", EncoderBlock(prev, w[g], 4 * n_blk)))
                    prev = w[g]
                if g < 3:
                    layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
                groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
            groups.append(("output", nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab, 1))]))))
            self.blocks = nn.Sequential(OrderedDict(groups))

    for cls, mod in ((Conv2d, "dall_e.utils"), (EncoderBlock, "dall_e.encoder"),
                     (Encoder, "dall_e.encoder")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__  # where pickle will look
        setattr(mods[mod], cls.__name__, cls)
    return mods


def test_dvae_reads_openai_pickled_module_without_dall_e(tmp_path, monkeypatch):
    mods = _fake_dall_e()
    with monkeypatch.context() as m:
        for name, mod in mods.items():
            m.setitem(sys.modules, name, mod)
        torch.manual_seed(0)
        fake = mods["dall_e.encoder"].Encoder()
        torch.save(fake, tmp_path / "encoder.pkl")
    assert "dall_e" not in sys.modules  # the package is gone at load time

    loaded = DVAEEncoder.load(tmp_path / "encoder.pkl")
    assert loaded.config == dict(n_hid=8, n_blk_per_group=2, vocab_size=64, input_size=112)
    assert set(loaded.state_dict()) == set(fake.state_dict())
    for k, v in fake.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = loaded.tokenize(_images(2, 112, 112))
    assert ids.shape == (2, 196) and int(ids.max()) < 64


class _CallsOnLoad:
    """Pickles as a call of os.getpid (harmless): a pickle may name any callable."""

    def __reduce__(self):
        return (os.getpid, ())


def test_dvae_pickle_naming_other_callables_is_refused(tmp_path):
    torch.save({"x": _CallsOnLoad()}, tmp_path / "evil.pkl")
    with pytest.raises(TokenizerWeightsError, match=r"refusing to unpickle posix\.getpid"):
        DVAEEncoder.load(tmp_path / "evil.pkl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_encoders_on_cuda_with_bf16(vqkd_model, dvae_model, vqkd_file):
    images = _images(4, 96, 96)
    for model in (vqkd_model, dvae_model):
        cpu_ids = model.tokenize(images)
        gpu = type(model)(**model.config).cuda()
        gpu.load_state_dict(model.state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ids = gpu.tokenize(images.cuda())
        assert ids.device.type == "cuda" and ids.shape == (4, 196)
        # fp32 both sides (outer autocast disabled); TF32/kernels may flip rare near-ties
        assert (ids.cpu() == cpu_ids).float().mean() > 0.95
        gpu.amp = True
        amp_ids = gpu.tokenize(images.cuda())
        assert amp_ids.dtype == torch.int64 and int(amp_ids.max()) < model.vocab_size
    loaded = VQKDEncoder.load(vqkd_file, num_heads=2, device="cuda")
    assert loaded.device.type == "cuda"
