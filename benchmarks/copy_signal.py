"""``diffiml bench copy-signal``: how visible a copied block is to self-correlation, before any training.

A block of the image is pasted elsewhere in the same image (translated, or rotated 30°) and every position of a
grid is scored by how well it matches some other position: the top-1 cosine similarity of centred, unit features
(own 3 x 3 neighbourhood excluded), and a soft mutual-best-match score, ``sum_k softmax_k(S/τ) · softmax_q(S/τ)``
(high where a position and its best partner prefer each other, low in sky and texture, where every position matches
many). The pixel AUC of each score against the copied block and its source says whether the features carry the
signal a trained stage would build on. Feature sets: the checkpoint encoder's stages, at the latent grid (1/8) or at
1/16, as the self-correlation stage could read them.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from diffiml.benchmarks.metrics import auc

FEATURE_SETS = ("stride4 pooled to 1/8", "stride8", "stride4 pooled + stride8", "stride8 pooled to 1/16 + stride16")


def _features(stages: list[torch.Tensor], name: str) -> torch.Tensor:
    return {"stride4 pooled to 1/8": lambda: F.avg_pool2d(stages[0], 2),
            "stride8": lambda: stages[1],
            "stride4 pooled + stride8": lambda: torch.cat([F.avg_pool2d(stages[0], 2), stages[1]], 1),
            "stride8 pooled to 1/16 + stride16": lambda: torch.cat([F.avg_pool2d(stages[1], 2), stages[2]], 1),
            }[name]()


def _scores(features: torch.Tensor, temperature: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    g = features.shape[-1]
    f = features.flatten(2)[0]
    u = F.normalize(f - f.mean(1, keepdim=True), dim=0)
    sim = u.T @ u
    ys, xs = (t.flatten() for t in torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"))
    near = ((ys[:, None] - ys[None]).abs() <= 1) & ((xs[:, None] - xs[None]).abs() <= 1)
    sim = sim.masked_fill(near, -2.0)
    mutual = (torch.softmax(sim / temperature, 1) * torch.softmax(sim / temperature, 0)).sum(1)
    return sim.max(1).values.numpy(), mutual.numpy()


@torch.no_grad()
def copy_signal(checkpoint: str, images: list[np.ndarray], block: int = 48, size: int = 256, seed: int = 0
                ) -> list[dict[str, Any]]:
    from diffiml.export.exporter import load_diffiml
    from diffiml.train.data.dataset import normalize_image

    if not 0 < block <= size // 2:
        raise ValueError(f"--block must be in 1..{size // 2} (a source and a copy must fit side by side)")
    model, _ = load_diffiml(checkpoint)
    encoder = model.encoder.eval()
    rows = []
    for mode in ("translated", "rotated 30°"):
        rng = np.random.default_rng(seed)
        found: dict[str, list[tuple[float, float]]] = {name: [] for name in FEATURE_SETS}
        for image in images:
            img = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
            while True:  # a source and a destination that do not overlap (possible: block <= size / 2)
                y0, x0, y1, x1 = (int(v) for v in rng.integers(0, size - block + 1, 4))
                if abs(y1 - y0) >= block or abs(x1 - x0) >= block:
                    break
            patch = img[y0 : y0 + block, x0 : x0 + block].copy()
            if mode != "translated":
                m = cv2.getRotationMatrix2D((block / 2, block / 2), 30, 1.0)
                patch = cv2.warpAffine(patch, m, (block, block), borderMode=cv2.BORDER_REFLECT)
            forged = img.copy()
            forged[y1 : y1 + block, x1 : x1 + block] = patch
            truth = np.zeros((size, size), np.uint8)
            truth[y0 : y0 + block, x0 : x0 + block] = truth[y1 : y1 + block, x1 : x1 + block] = 1
            stages = encoder.stages(normalize_image(forged)[None])
            for name in FEATURE_SETS:
                feats = _features(stages, name)
                top, mutual = _scores(feats)
                g = feats.shape[-1]
                cells = (cv2.resize(truth, (g, g), interpolation=cv2.INTER_AREA) > 0).ravel()
                found[name].append((auc(top, cells), auc(mutual, cells)))
        for name, values in found.items():
            a = np.array(values)
            rows.append({"copy": mode, "features": name, "grid": int(_features(stages, name).shape[-1]),
                         "top1_auc": round(float(np.nanmean(a[:, 0])), 3),
                         "mutual_auc": round(float(np.nanmean(a[:, 1])), 3), "images": len(values)})
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| copy | features | grid | top-1 similarity AUC | mutual best match AUC |", "|---|---|---|---|---|"]
    lines += [f"| {r['copy']} | {r['features']} | {r['grid']}² | {r['top1_auc']:.3f} | {r['mutual_auc']:.3f} |"
              for r in rows]
    return "\n".join(lines) + "\n"
