"""Representation-similarity measures for `saelab similarity` (docs/methods.md §9.4).

All take two representations of the *same* N inputs, ``X_ND`` and ``Y_NE`` (widths may
differ), except :func:`jaccard`, which compares ITDA atom label sets, and
:func:`align_token_ends`, which finds the inputs two tokenisations share.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

import torch
from torch import Tensor


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two label sets (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0


def _centre(x: Tensor) -> Tensor:
    x = x.double()
    return x - x.mean(0, keepdim=True)


def linear_cka(X_ND: Tensor, Y_NE: Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019): ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`` on centred data."""
    X, Y = _centre(X_ND), _centre(Y_NE)
    num = (Y.T @ X).square().sum()
    den = (X.T @ X).norm() * (Y.T @ Y).norm()
    return float(num / den) if den > 0 else 0.0


def centred(X_ND: Tensor) -> tuple[Tensor, float]:
    """Column-centred ``X`` (float32) and ``‖XcᵀXc‖_F``: the per-layer state of
    :func:`cka_from_centred`."""
    Xc = X_ND.float() - X_ND.float().mean(0, keepdim=True)
    return Xc, float((Xc.T.double() @ Xc.double()).norm())


def cka_from_centred(Xc_ND: Tensor, nx: float, Yc_NE: Tensor, ny: float) -> float:
    """Linear CKA ``‖YcᵀXc‖²_F / (nx·ny)`` from :func:`centred` states (equals
    :func:`linear_cka`). A pair costs ``N·D·E`` and no ``N²`` memory, so it scales to many
    positions."""
    num = (Yc_NE.T @ Xc_ND).double().square().sum()
    den = nx * ny
    return float(num / den) if den > 0 else 0.0


def relative_vectors(X_ND: Tensor, n_anchors: int = 300, seed: int = 0) -> Tensor:
    """Unit relative vectors ``[N, A]`` (cosines to the random anchor inputs, normalised) of
    :func:`relative_similarity`; the anchors depend only on ``N`` and ``seed``."""
    n = X_ND.shape[0]
    anchors = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n_anchors, n)]
    Zn = torch.nn.functional.normalize(X_ND.double(), dim=1)
    return torch.nn.functional.normalize(Zn @ Zn[anchors].T, dim=1)


def svcca(X_ND: Tensor, Y_NE: Tensor, n_components: int = 20) -> float:
    """SVCCA (Raghu et al. 2017): keep each side's top ``n_components`` singular directions,
    then the mean canonical correlation between the two reduced representations."""
    return svcca_from_bases(svcca_basis(X_ND, n_components), svcca_basis(Y_NE, n_components))


def svcca_basis(X_ND: Tensor, n_components: int = 20) -> Tensor:
    """Orthonormal basis ``[N, ≤n]`` of the top singular directions of centred ``X``."""
    U, S, _ = torch.linalg.svd(_centre(X_ND), full_matrices=False)
    keep = min(n_components, int((S > S[0] * 1e-10).sum()) if len(S) else 0)
    return U[:, :keep]


def svcca_from_bases(Qx: Tensor, Qy: Tensor) -> float:
    """Mean canonical correlation of two reduced representations given as orthonormal bases:
    the canonical correlations are the singular values of ``Qxᵀ Qy``."""
    if min(Qx.shape[1], Qy.shape[1]) == 0:
        return 0.0
    return float(torch.linalg.svdvals(Qx.T @ Qy).clamp(0, 1).mean())


def relative_similarity(X_ND: Tensor, Y_NE: Tensor, n_anchors: int = 300, seed: int = 0) -> float:
    """Relative representations (Moschella et al. 2023), as in the ITDA reference code: each
    input becomes its cosines to the same random anchor inputs in each space; the score is the
    mean cosine between an input's two relative vectors."""
    Rx, Ry = relative_vectors(X_ND, n_anchors, seed), relative_vectors(Y_NE, n_anchors, seed)
    return float((Rx * Ry).sum(1).mean())


def align_token_ends(ends_a: Tensor, ends_b: Tensor) -> tuple[Tensor, Tensor]:
    """Indices ``(ia, ib)`` of the tokens of two tokenisations of one text that end at the
    same character (``ends_*``: increasing end offsets; negative entries are ignored)."""
    ea, eb = ends_a.long(), ends_b.long()
    common, ia, ib = [], [], []
    pos_b = {int(e): j for j, e in enumerate(eb.tolist()) if e >= 0}
    for i, e in enumerate(ea.tolist()):
        if e >= 0 and e in pos_b:
            common.append(e)
            ia.append(i)
            ib.append(pos_b[e])
    return torch.tensor(ia, dtype=torch.long), torch.tensor(ib, dtype=torch.long)


def best_matches(S_LM: Tensor) -> tuple[list[int], list[float]]:
    """For each row layer, the column layer of highest similarity and the |difference in
    relative depth| between them (depth = layer / (n_layers - 1))."""
    L, M = S_LM.shape
    best = S_LM.argmax(1).tolist()
    depth = [abs(i / max(L - 1, 1) - j / max(M - 1, 1)) for i, j in enumerate(best)]
    return best, depth
