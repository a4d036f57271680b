"""Token store: layout, reading by sample id, mismatch errors, int16 limits, chunks."""

import json
import os

import numpy as np
import pytest
import torch

from mapet_ds.filelist import FileList
from mapet_ds.tokenizers.diagnostics import code_usage, format_usage, usage_scalars
from mapet_ds.tokenizers.store import TokenStore, TokenStoreError


def _filelist(tmp_path, n=10, prefix="img"):
    return FileList(tmp_path / "train.txt", tmp_path, [f"{prefix}{i}.jpg" for i in range(n)], [i % 3 for i in range(n)])


def _fill(store, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.integers(0, store.vocab, size=(store.num_images, store.grid**2)).astype(np.int16)
    for c in range(store.num_chunks):
        r = store.chunk_range(c)
        store.write_chunk(c, table[r.start : r.stop])
    return table


def test_create_fill_open_rows(tmp_path):
    fl = _filelist(tmp_path)
    store = TokenStore.create(tmp_path / "tok", fl, grid=2, vocab=50, spec={"kind": "test"}, chunk_size=4)
    assert store.num_chunks == 3 and not store.complete
    assert (np.asarray(store.tokens) == -1).all()  # unwritten rows are marked
    table = _fill(store)
    assert store.finalise()
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["complete"] and meta["rows_complete"] == 10 and meta["digest"] == fl.digest()
    assert meta["spec"] == {"kind": "test"} and meta["grid"] == 2 and meta["vocab"] == 50
    assert not [n for n in os.listdir(tmp_path / "tok") if ".tmp" in n]  # atomic writes left nothing behind

    st = TokenStore.open(tmp_path / "tok", filelist=fl, grid=2, vocab=50)
    rows = st.rows(torch.tensor([7, 0, 7, 3]))
    assert rows.dtype == torch.int64 and rows.shape == (4, 4)
    np.testing.assert_array_equal(rows.numpy(), table[[7, 0, 7, 3]])
    np.testing.assert_array_equal(st.rows([9]).numpy(), table[[9]])
    full = st.as_tensor("cpu")
    assert full.dtype == torch.int16 and full.shape == (10, 4)
    ids = torch.tensor([2, 5])
    np.testing.assert_array_equal(full[ids].long().numpy(), table[[2, 5]])
    with pytest.raises(TokenStoreError, match="sample id 10 is outside"):
        st.rows([1, 10])


def test_mismatch_errors_name_both_values_and_fix(tmp_path):
    fl = _filelist(tmp_path)
    store = TokenStore.create(tmp_path / "tok", fl, grid=2, vocab=50, spec={}, chunk_size=16)
    _fill(store)
    store.finalise()
    p = tmp_path / "tok"
    with pytest.raises(TokenStoreError, match=r"has 10 rows but file list .* has 11 images.*launch/tokens.py assign"):
        TokenStore.open(p, filelist=_filelist(tmp_path, n=11))
    other = _filelist(tmp_path, prefix="other")  # same count, other images
    with pytest.raises(TokenStoreError, match=rf"other images .*digest {fl.digest()[:12]}.*digest {other.digest()[:12]}"):
        TokenStore.open(p, filelist=other)
    with pytest.raises(TokenStoreError, match=r"2x2 token grid but the model's patch grid is 14x14"):
        TokenStore.open(p, grid=14)
    with pytest.raises(TokenStoreError, match=r"vocab 50 but the model predicts 8192"):
        TokenStore.open(p, vocab=8192)
    with pytest.raises(TokenStoreError, match=r"no token store at .*nowhere"):
        TokenStore.open(tmp_path / "nowhere")
    for kwargs in ({"filelist": other}, {"grid": 3}, {"vocab": 3}):
        with pytest.raises(TokenStoreError) as e:
            TokenStore.open(p, **kwargs)
        assert "\n" not in str(e.value)  # one line


def test_vocab_over_int16_refused(tmp_path):
    fl = _filelist(tmp_path)
    with pytest.raises(TokenStoreError, match="32767"):
        TokenStore.create(tmp_path / "tok", fl, grid=2, vocab=32768, spec={})
    store = TokenStore.create(tmp_path / "tok", fl, grid=2, vocab=32767, spec={}, chunk_size=100)
    table = np.full((10, 4), 32766, np.int16)
    store.write_chunk(0, table)
    assert TokenStore.open(tmp_path / "tok").rows([0]).max().item() == 32766


def test_incomplete_store_and_bad_chunks(tmp_path):
    fl = _filelist(tmp_path)
    store = TokenStore.create(tmp_path / "tok", fl, grid=2, vocab=50, spec={}, chunk_size=4)
    store.write_chunk(1, np.zeros((4, 4), np.int16))
    assert store.done_chunks() == {1}
    assert store.complete_rows().tolist() == [False] * 4 + [True] * 4 + [False] * 2
    assert not store.finalise()
    with pytest.raises(TokenStoreError, match=r"incomplete \(4 of 10 rows\).*re-run the same"):
        TokenStore.open(tmp_path / "tok")
    assert TokenStore.open(tmp_path / "tok", allow_incomplete=True).done_chunks() == {1}
    with pytest.raises(TokenStoreError, match="outside 0..49"):
        store.write_chunk(0, np.full((4, 4), 50, np.int16))
    with pytest.raises(TokenStoreError, match=r"expected tokens \(2, 4\)"):
        store.write_chunk(2, np.zeros((4, 4), np.int16))  # the last chunk has 2 rows


def test_code_usage_counts_and_perplexity():
    tokens = torch.tensor([[0, 0, 0, 1], [1, 2, 2, 2], [3, 3, 3, 3]])
    u = code_usage(tokens, vocab=8, top=2)
    assert u["codes_used"] == 4 and u["num_tokens"] == 12 and u["used_fraction"] == 0.5
    p = np.array([3, 2, 3, 4]) / 12
    assert u["perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())))
    assert u["most_used"] == [[3, 4], [0, 3]] and u["least_used"] == [[1, 2], [2, 3]]
    uniform = code_usage(np.arange(16) % 8, vocab=8)
    assert uniform["perplexity"] == pytest.approx(8.0) and uniform["max_share"] == pytest.approx(1 / 8)
    assert "codes used" in format_usage(u) and "collapse" in format_usage(code_usage(np.zeros(10, int), 64))
    assert usage_scalars(u)["tokens/codes_used"] == 4.0
    with pytest.raises(ValueError, match="token id 9 >= vocab 8"):
        code_usage(np.array([9]), vocab=8)


# ---------------------------------------------------------------- tokenizer view


class _FakeTokenizer:
    input_size, grid, vocab_size, device = 8, 2, 5, torch.device("cpu")

    def spec(self):
        return {"kind": "fake"}

    def tokenize(self, images):  # uint8 [B,3,8,8] -> [B,4]
        return images[:, 0, ::4, ::4].reshape(len(images), 4).long() % 5


def _fake_loader(fl, *, size, batch_size, **_):
    for s in range(0, len(fl), batch_size):
        ids = torch.arange(s, min(s + batch_size, len(fl)))
        yield {"images": ids.view(-1, 1, 1, 1).expand(-1, 3, size, size).to(torch.uint8), "sample_ids": ids}


def test_store_records_tokenizer_view_and_refuses_another(tmp_path):
    from mapet_ds.pipelines.graphs import pretrain_view_spec, tokenizer_view_spec
    from mapet_ds.tokenizers.store import assign_tokens

    fl = _filelist(tmp_path)
    assign_tokens(fl, _FakeTokenizer(), tmp_path / "tok", batch_size=4, loader=_fake_loader, progress=False)
    meta = json.loads((tmp_path / "tok" / "meta.json").read_text())
    assert meta["view"] == {"crop": "center_square", "size": 8, "interpolation": "bicubic",
                            "crop_anchor": "floor"} == tokenizer_view_spec(8)
    TokenStore.open(tmp_path / "tok", filelist=fl, grid=2, view=pretrain_view_spec(False))  # the default view fits
    with pytest.raises(TokenStoreError) as e:
        TokenStore.open(tmp_path / "tok", filelist=fl, grid=2, view=pretrain_view_spec(True))
    assert str(e.value) == (
        f"token store {tmp_path / 'tok'} holds tokens of another view than training uses (crop 'center_square' vs "
        f"'random_resized_crop'): every target would belong to other pixels than its patch; train on the store's "
        f"view (data.random_resized_crop=false for a centre_square store) or re-run `launch/tokens.py assign` for "
        f"this file list and tokenizer into a new --out from the training view")


def test_store_without_view_is_refused_as_the_old_centre_square(tmp_path):
    from mapet_ds.pipelines.graphs import pretrain_view_spec

    fl = _filelist(tmp_path)
    store = TokenStore.create(tmp_path / "tok", fl, grid=2, vocab=50, spec={}, chunk_size=16)
    _fill(store)
    store.finalise()
    meta_path = tmp_path / "tok" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta.pop("view") is None
    meta_path.write_text(json.dumps(meta))  # as written before views were recorded
    # written before views (and the floored centre-square anchor) were recorded: refused in one line
    with pytest.raises(TokenStoreError, match=r"made with the old centre-square rounding .*launch/tokens.py assign"):
        TokenStore.open(tmp_path / "tok", filelist=fl, view=pretrain_view_spec(False))
    with pytest.raises(TokenStoreError, match="crop 'center_square' vs 'random_resized"):
        TokenStore.open(tmp_path / "tok", filelist=fl, view=pretrain_view_spec(True))
