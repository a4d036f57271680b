"""PretrainModel against an independent fp64 reference written from mapet_ds/docs/METHOD.md.

The reference below shares no code with mapet_ds.models: it reads the model's weights by
their (timm) names and recomputes everything else itself with explicit loops: the patch
embedding (one dot product per patch), the content and query streams (METHOD.md 2.2), the
allowed keys of every row (one test of the table in METHOD.md 2.3 per key), softmax
attention over those keys only, the block (2.4), target gathering and cross-entropy (2.5),
and the MIM / PeT variants (3). Every weight is randomised first (LayerScale, biases and
LayerNorm affines included), so a swapped or misplaced weight cannot hide behind an init
value. Logits, loss and parameter gradients must agree to ~1e-10.
"""

from __future__ import annotations

import math

import pytest
import torch

from mapet_ds.config import ModelConfig, ObjectiveConfig
from mapet_ds.models.objectives import plan_from_rank
from mapet_ds.models.pretrain import PretrainModel

VOCAB = 24
TOL = dict(rtol=1e-10, atol=1e-10)
# a few parameters of every kind: stem, first/last block, LayerScale, the MaPeT-only token, head
GRAD_PARAMS = ("mask_token", "backbone.pos_embed", "backbone.cls_token", "backbone.patch_embed.proj.weight",
               "backbone.blocks.0.attn.qkv.weight", "backbone.blocks.0.ls1.gamma", "backbone.blocks.1.ls2.gamma",
               "backbone.blocks.1.mlp.fc1.bias", "backbone.norm.weight", "lm_head.weight")


# ---------------------------------------------------------------------------------------
# The reference (fp64, one sample at a time)


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim, biased variance (METHOD.md 5: eps 1e-6)."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w.T + b


class Reference:
    """Weights: fp64 leaf copies of a PretrainModel state dict (grad enabled)."""

    def __init__(self, state: dict, depth: int, num_heads: int, patch: int):
        self.w = {k: v.detach().clone().double().requires_grad_(True) for k, v in state.items()
                  if v.is_floating_point()}
        self.depth, self.heads, self.patch = depth, num_heads, patch

    def p(self, name: str) -> torch.Tensor:
        return self.w[name]

    # METHOD.md 2.2: x_t = patch_embed(patch t) + pos_embed[t], row-major patches, CLS first
    def patch_embeddings(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image [3, H, W] -> list of N embeddings [D] (no position), row-major."""
        p = self.patch
        w = self.p("backbone.patch_embed.proj.weight")  # [D, 3, p, p]
        b = self.p("backbone.patch_embed.proj.bias")
        grid_h, grid_w = image.shape[1] // p, image.shape[2] // p
        out = []
        for r in range(grid_h):
            for c in range(grid_w):
                pixels = image[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1)
                out.append(w.reshape(w.shape[0], -1) @ pixels + b)
        return out

    def pos(self, t: int) -> torch.Tensor:
        return self.p("backbone.pos_embed")[0, t]

    def attention(self, i: int, rows: torch.Tensor, keys: torch.Tensor, allowed: list[list[int]]) -> torch.Tensor:
        """Multi-head softmax attention of block i, row by row over its allowed keys only.

        rows [R, D] and keys [K, D] are already normalised (LN1); returns proj(attn) [R, D].
        """
        pre = f"backbone.blocks.{i}.attn."
        wqkv, bqkv = self.p(pre + "qkv.weight"), self.p(pre + "qkv.bias")
        d = rows.shape[1]
        hd = d // self.heads
        q = _lin(rows, wqkv[:d], bqkv[:d]).view(-1, self.heads, hd)
        k = _lin(keys, wqkv[d:2 * d], bqkv[d:2 * d]).view(-1, self.heads, hd)
        v = _lin(keys, wqkv[2 * d:], bqkv[2 * d:]).view(-1, self.heads, hd)
        out = []
        for r, keys_r in enumerate(allowed):
            assert keys_r, f"row {r} may attend to nothing"
            heads = []
            for h in range(self.heads):
                scores = torch.stack([q[r, h] @ k[j, h] for j in keys_r]) / math.sqrt(hd)
                weights = torch.softmax(scores, dim=0)
                heads.append(sum(wj * v[j, h] for wj, j in zip(weights, keys_r)))
            out.append(torch.cat(heads))
        return _lin(torch.stack(out), self.p(pre + "proj.weight"), self.p(pre + "proj.bias"))

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        pre = f"backbone.blocks.{i}.mlp."
        return _lin(_gelu(_lin(x, self.p(pre + "fc1.weight"), self.p(pre + "fc1.bias"))),
                    self.p(pre + "fc2.weight"), self.p(pre + "fc2.bias"))

    def blocks(self, h: torch.Tensor, g: torch.Tensor, allowed_h, allowed_g) -> tuple[torch.Tensor, torch.Tensor]:
        """METHOD.md 2.4: content h [Lc, D], query g [m, D] (m may be 0 for mim)."""
        for i in range(self.depth):
            pre = f"backbone.blocks.{i}."
            n1 = lambda x: _ln(x, self.p(pre + "norm1.weight"), self.p(pre + "norm1.bias"))  # noqa: E731
            n2 = lambda x: _ln(x, self.p(pre + "norm2.weight"), self.p(pre + "norm2.bias"))  # noqa: E731
            ls1, ls2 = self.p(pre + "ls1.gamma"), self.p(pre + "ls2.gamma")
            keys = n1(h)  # keys/values from the content stream of this layer, before its update
            h_new = h + ls1 * self.attention(i, keys, keys, allowed_h)
            if g.shape[0]:
                g = g + ls1 * self.attention(i, n1(g), keys, allowed_g)
                g = g + ls2 * self.mlp(i, n2(g))
            h = h_new + ls2 * self.mlp(i, n2(h_new))
        return h, g

    def head_loss(self, feats: torch.Tensor, targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """METHOD.md 2.5: final LN, head; CE summed over the rows. feats [m, D] -> logits [m, V], sum."""
        z = _ln(feats, self.p("backbone.norm.weight"), self.p("backbone.norm.bias"))
        logits = _lin(z, self.p("lm_head.weight"), self.p("lm_head.bias"))
        total = sum(torch.logsumexp(logits[r], 0) - logits[r, y] for r, y in enumerate(targets))
        return logits, total

    # ------------------------------------------------------------------------------
    def permuted(self, kind: str, image: torch.Tensor, tokens: list[int], rank: list[int], m: int):
        """mapet / pet for one sample (METHOD.md 2.1-2.5, 3).

        rank: steps 1..N of patches 1..N (list index 0 = token 1); CLS is step 0.
        Returns (P, logits [m, V], summed CE).
        """
        n = len(rank)
        r = [0] + list(rank)  # r[t] for tokens t = 0..N
        c = n + 1 - m  # 2.1: the first c steps are context, CLS included
        is_ctx = [r[t] < c for t in range(n + 1)]
        P = [t for t in range(1, n + 1) if not is_ctx[t]]  # spatial order
        assert len(P) == m

        # 2.2 streams
        x = [self.p("backbone.cls_token")[0, 0] + self.pos(0)]
        x += [e + self.pos(t + 1) for t, e in enumerate(self.patch_embeddings(image))]
        aux = [self.p("mask_token")[0, 0] + self.pos(p) for p in P]
        content = [("x", t) for t in range(n + 1)] + ([("a", p) for p in P] if kind == "mapet" else [])
        h = torch.stack(x + (aux if kind == "mapet" else []))
        g = torch.stack(aux)

        # 2.3 one rule per (row, key)
        def may_attend(row: tuple[str, int], key: tuple[str, int]) -> bool:
            rk, t = row
            kk, q = key
            if kk == "x":
                if is_ctx[q]:
                    return True
                if rk == "g":
                    return r[q] < r[t]
                if rk == "x" and not is_ctx[t]:
                    return r[q] <= r[t]
                return False  # context content rows and auxiliary rows see no predicted x
            # key a_q
            if rk == "g":
                return r[q] >= r[t]
            if rk == "x" and not is_ctx[t]:
                return r[q] > r[t]
            return True  # context content rows and auxiliary rows see every a_q

        allowed_h = [[j for j, key in enumerate(content) if may_attend(row, key)] for row in content]
        allowed_g = [[j for j, key in enumerate(content) if may_attend(("g", p), key)] for p in P]
        _, g = self.blocks(h, g, allowed_h, allowed_g)
        logits, total = self.head_loss(g, [tokens[p - 1] for p in P])
        return P, logits, total

    def mim(self, image: torch.Tensor, tokens: list[int], masked: list[int]):
        """BEiT (METHOD.md 3) for one sample; masked: patch tokens 1..N (any order)."""
        n_masked = sorted(masked)
        emb = self.patch_embeddings(image)
        x = [self.p("backbone.cls_token")[0, 0] + self.pos(0)]
        for t in range(1, len(emb) + 1):
            e = self.p("mask_token")[0, 0] if t in n_masked else emb[t - 1]
            x.append(e + self.pos(t))
        h = torch.stack(x)
        every = [list(range(h.shape[0]))] * h.shape[0]
        h, _ = self.blocks(h, h[:0], every, [])
        logits, total = self.head_loss(h[n_masked], [tokens[t - 1] for t in n_masked])
        return n_masked, logits, total


# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    # 4x4 patches of 8 px, 2 blocks, 3 heads: every rule is exercised, the loops stay cheap
    return ModelConfig(size=None, embed_dim=24, depth=2, num_heads=3, img_size=32, patch_size=8, drop_path=0.0)


def _model(cfg: ModelConfig, kind: str, seed: int = 0) -> PretrainModel:
    torch.manual_seed(seed)
    obj = ObjectiveConfig(name=kind, mask_patches=6, min_block_patches=2)
    model = PretrainModel(cfg, obj, VOCAB).double().train()
    with torch.no_grad():  # every weight random and distinct (LayerScale, LN affines, biases too)
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.uniform_(0.2, 1.2)
            elif "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _compare(model: PretrainModel, ref: Reference, images, tokens, plan, per_sample) -> None:
    """per_sample(b) -> (P tokens 1..N, logits [m, V], summed CE) from the reference."""
    out = model(images, tokens, plan)
    out["loss"].backward()
    b, m = plan.predicted.shape
    ref_total = 0.0
    for i in range(b):
        P, logits, total = per_sample(i)
        # targets and logit rows in spatial order of the predicted patches (METHOD.md 2.1)
        assert [p - 1 for p in P] == plan.predicted[i].tolist()
        torch.testing.assert_close(out["targets"][i], tokens[i, [p - 1 for p in P]].long())
        torch.testing.assert_close(out["logits"][i], logits, **TOL, msg=lambda s: f"logits of sample {i}: {s}")
        ref_total = ref_total + total
    ref_loss = ref_total / (b * m)  # 2.5: mean over B*m
    torch.testing.assert_close(out["loss"], ref_loss, **TOL)
    ref_loss.backward()
    grads = dict(model.named_parameters())
    for name in GRAD_PARAMS:
        torch.testing.assert_close(grads[name].grad, ref.w[name].grad, **TOL, msg=lambda s: f"grad {name}: {s}")


def _batch(cfg: ModelConfig, b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, cfg.img_size, cfg.img_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (b, cfg.num_patches), generator=g)
    return images, tokens


@pytest.mark.parametrize("kind", ["mapet", "pet"])
@pytest.mark.parametrize("m", [1, 5, 12, 16])  # m = 1, 16 = N: context is CLS alone
def test_permuted_objectives_match_reference(cfg, kind, m):
    n = cfg.num_patches
    model = _model(cfg, kind, seed=m)
    ref = Reference(model.state_dict(), cfg.depth, cfg.num_heads, cfg.patch_size)
    images, tokens = _batch(cfg, 2, seed=100 + m)
    g = torch.Generator().manual_seed(m)
    rank = torch.stack([torch.randperm(n, generator=g) + 1 for _ in range(2)])
    plan = plan_from_rank(kind, rank, m)
    _compare(model, ref, images, tokens, plan,
             lambda i: ref.permuted(kind, images[i], tokens[i].tolist(), rank[i].tolist(), m))


@pytest.mark.parametrize("masked", [6, 1])
def test_mim_matches_reference(cfg, masked):
    model = _model(cfg, "mim")
    model.objective_cfg = model.objective_cfg.model_copy(update={"mask_patches": masked})
    ref = Reference(model.state_dict(), cfg.depth, cfg.num_heads, cfg.patch_size)
    images, tokens = _batch(cfg, 2, seed=7)
    plan = model.sample_plan(2, "cpu", torch.Generator().manual_seed(masked))  # the model's own block sampler
    assert plan.predicted.shape == (2, masked)
    _compare(model, ref, images, tokens, plan,
             lambda i: ref.mim(images[i], tokens[i].tolist(), [t + 1 for t in plan.predicted[i].tolist()]))
