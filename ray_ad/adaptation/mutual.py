"""Label-free scoring of an unlabeled image set against itself, and memory-bank subsampling.

Mutual scoring (MuSc, Li et al., ICLR 2024): a normal cell has close matches in most other images of
the same product, a defect in almost none. Each cell is compared with every cell of each *other*
image (never its own, so a defect cannot vouch for itself); of those per-image nearest distances the
lowest ``fraction`` are averaged. Averaging the lowest few, rather than taking the overall minimum,
keeps a defect that happens to recur in a handful of images from scoring as normal.
"""

from __future__ import annotations

import torch


def cells(features: torch.Tensor) -> torch.Tensor:
    """``[N, C, G, G]`` feature maps -> ``[N, G*G, C]`` cell vectors."""
    return features.flatten(2).transpose(1, 2).contiguous()


@torch.no_grad()
def mutual_scores(
    cell_features: torch.Tensor, fraction: float = 0.3, max_references: int | None = 64, seed: int = 0
) -> torch.Tensor:
    """Mutual score ``[N, L]`` of every cell of ``cell_features`` ``[N, L, C]``.

    Each image is compared with ``max_references`` other images drawn at random (all others when
    None or when there are fewer): the cost is then linear in N, and the mean over the lowest
    fraction of a random subset estimates the same quantity as over all of them.
    """
    n, length, _ = cell_features.shape
    if n < 2:
        raise ValueError(f"mutual scoring needs at least 2 images, got {n}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    scores = torch.empty(n, length)
    for i in range(n):
        others = torch.cat([torch.arange(i), torch.arange(i + 1, n)])  # never the image itself
        if max_references is not None and len(others) > max_references:
            others = others[torch.randperm(len(others), generator=generator)[:max_references]]
        scores[i] = score_against(cell_features[i], cell_features[others], fraction)
    return scores


def score_against(query: torch.Tensor, references: torch.Tensor, fraction: float) -> torch.Tensor:
    """Score ``[L]`` of each query cell ``[L, C]``: its nearest-cell distance in each reference image
    ``[R, L', C]``, the lowest ``fraction`` of those R distances averaged."""
    count, length = references.shape[0], references.shape[1]
    distances = torch.cdist(query[None], references.reshape(1, -1, references.shape[-1]))[0]
    nearest_per_image = distances.view(len(query), count, length).amin(-1)  # [L, R]
    k = max(1, round(fraction * count))
    return nearest_per_image.topk(k, dim=1, largest=False).values.mean(1)


@torch.no_grad()
def greedy_coreset(points: torch.Tensor, size: int, projection_dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Indices of ``size`` points chosen by greedy k-centre (PatchCore's coreset).

    Distances are taken in a random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss),
    as PatchCore does (it projects to 128), so selection costs ``size * N * projection_dim``. Each step
    streams the whole projected set through memory, so on a CPU the step time is that of reading
    ``N * projection_dim`` floats: 32 dimensions keep 190k cells at a few milliseconds a step.
    """
    n = len(points)
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    if points.shape[1] > projection_dim:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection
    # Squared distances by ||p||^2 - 2 p.c + ||c||^2: one matrix-vector product per step, not a cdist.
    squared_norms = (points * points).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = squared_norms - 2 * points @ points[chosen[0]] + squared_norms[chosen[0]]
    for k in range(1, size):
        chosen[k] = int(nearest.argmax())
        centre = points[chosen[k]]
        torch.minimum(nearest, squared_norms - 2 * points @ centre + squared_norms[chosen[k]], out=nearest)
    return chosen


@torch.no_grad()
def nearest_distance(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 32768, shortlist: int = 8,
                     query_chunk: int = 4096) -> torch.Tensor:
    """Distance ``[Q]`` from each query ``[Q, C]`` to its nearest row of ``bank`` ``[M, C]``.

    ``cdist`` computes ||q||^2 - 2 q.b + ||b||^2 with a matrix product, whose rounding (about 1e-3 of a
    near neighbour's distance) depends on how many queries share the product: the same image scored
    5e-3 apart alone and in a batch. So the product only shortlists the ``shortlist`` nearest rows per
    query, and the distance to each is recomputed directly from the difference vector, row by row: an
    image's score then does not depend on the other images of its batch.
    """
    out = []
    for query in queries.split(query_chunk):
        out.append(_exact_distances(query, bank, _shortlist(query, bank, shortlist, chunk)).amin(1))
    return torch.cat(out) if out else torch.empty(0, device=queries.device)


def _shortlist(query: torch.Tensor, bank: torch.Tensor, size: int, chunk: int) -> torch.Tensor:
    """Indices ``[q, size]`` of the ``size`` nearest ``bank`` rows of each query row, by ``cdist`` over
    bank chunks (its matrix-product rounding only decides the shortlist, not a distance)."""
    best = torch.empty(len(query), 0, device=query.device)
    best_index = torch.empty(len(query), 0, dtype=torch.long, device=query.device)
    for start in range(0, len(bank), chunk):
        approx = torch.cdist(query, bank[start : start + chunk])
        values, index = approx.topk(min(size, approx.shape[1]), dim=1, largest=False)
        best, order = torch.cat([best, values], 1).topk(min(size, best.shape[1] + values.shape[1]), dim=1,
                                                       largest=False)
        best_index = torch.cat([best_index, index + start], 1).gather(1, order)
    return best_index


def _exact_distances(query: torch.Tensor, bank: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Distances ``[q, s]`` from each query row to its shortlisted bank rows, from the difference vectors."""
    return (query[:, None, :] - bank[index]).pow(2).sum(-1).sqrt()


@torch.no_grad()
def kth_image_distance(queries: torch.Tensor, bank: torch.Tensor, owners: torch.Tensor, k: int,
                       chunk: int = 32768, query_chunk: int = 4096) -> torch.Tensor:
    """Distance ``[Q]`` from each query cell ``[Q, C]`` to the nearest ``bank`` cell ``[M, C]`` of the
    ``k``-th distinct image that matches it (``owners`` ``[M]``: the image each bank cell came from;
    images ranked by their nearest cell).

    ``k = 1`` is the nearest cell of all (PatchCore). A larger k asks that what looks normal recur in k
    landed images: a defect kept in a contaminated memory then vouches for a test defect only if k
    landed images share it. The k nearest images are found among a shortlist of the ``8 k`` (at least
    32) nearest cells; a cell whose shortlist holds fewer than k images takes the shortlist's farthest
    distance, a lower bound of the true one. Distances are recomputed from the difference vectors, as
    in ``nearest_distance``, so an image's score does not depend on its batch.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(owners) != len(bank):
        raise ValueError(f"{len(owners)} owners for {len(bank)} bank cells")
    images = len(torch.unique(owners))
    if k > images:
        raise ValueError(f"k={k} needs a bank of at least {k} images, got {images}")
    shortlist = min(len(bank), max(32, 8 * k))
    out = []
    for query in queries.split(query_chunk):
        best_index = _shortlist(query, bank, shortlist, chunk)
        exact, order = _exact_distances(query, bank, best_index).sort(1)
        image = owners[best_index].gather(1, order)
        # A shortlisted cell opens a new image when no nearer cell of the list came from that image.
        opens = ~(image[:, :, None] == image[:, None, :]).tril(-1).any(2)
        hit = (opens.cumsum(1) == k) & opens
        last = torch.full((len(query),), exact.shape[1] - 1, dtype=torch.long, device=query.device)
        position = torch.where(hit.any(1), hit.long().argmax(1), last)
        out.append(exact.gather(1, position[:, None])[:, 0])
    return torch.cat(out) if out else torch.empty(0, device=queries.device)
