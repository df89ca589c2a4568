"""Shared test helpers: seeded tensor factories and a forward/backward comparer."""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: every random test draws from one of these."""
    return torch.Generator().manual_seed(seed)


def uniform(shape, gen: torch.Generator, low: float = -1.0, high: float = 1.0,
            dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded samples of U(low, high) (drawn in float64, then cast, so dtypes share values)."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def normal(shape, gen: torch.Generator, std: float = 1.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """Seeded samples of N(0, std^2) (drawn in float64, then cast)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def forward_backward(fn: Callable[..., Tensor], tensors: Mapping[str, Tensor | None], grad_seed: int,
                     **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """Run fn(**tensors, **kwargs), then backpropagate a seeded random output gradient.

    Tensors are detached (keeping their strides) and made leaves requiring grad;
    None entries are passed through as None. Returns the output and the
    gradient of every non-None tensor, by name.
    """
    leaves = {name: (t.detach().requires_grad_(True) if t is not None else None)
              for name, t in tensors.items()}
    out = fn(**leaves, **kwargs)
    grad_out = normal(out.shape, generator(grad_seed), dtype=out.dtype).to(out.device)
    names = [name for name, t in leaves.items() if t is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out, allow_unused=False)
    return out.detach(), dict(zip(names, grads))


def scale_of(t: Tensor) -> float:
    """Largest magnitude of `t` (at least a tiny positive number), for relative tolerances."""
    return max(float(t.detach().abs().max()) if t.numel() else 0.0, 1e-30)


def assert_close_scaled(actual: Tensor, expected: Tensor, rel: float, name: str = "") -> None:
    """|actual - expected| <= rel * max|expected| elementwise (plus rel relative), same shape/dtype."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale_of(expected),
                               msg=lambda m: f"{name}: {m}")


def assert_results_match(actual: tuple[Tensor, dict[str, Tensor]],
                         expected: tuple[Tensor, dict[str, Tensor]], rel: float) -> None:
    """Outputs and every gradient of two forward_backward results agree to `rel` of their scale."""
    out_a, grads_a = actual
    out_e, grads_e = expected
    assert set(grads_a) == set(grads_e)
    assert_close_scaled(out_a, out_e.to(out_a.dtype), rel, "output")
    for name in grads_e:
        assert_close_scaled(grads_a[name], grads_e[name].to(grads_a[name].dtype), rel, f"grad of {name}")


def random_rois(gen: torch.Generator, count: int, batch: int, image_h: float, image_w: float,
                min_size: float, max_size: float, dtype=torch.float64) -> torch.Tensor:
    """[count, 5] RoIs in image pixels: centres over [-0.2, 1.2] of the image, so that many
    stick out of it, sides in [min_size, max_size], batch indices drawn over the whole batch."""
    index = torch.randint(0, batch, (count,), generator=gen).to(torch.float64)
    cx = uniform((count,), gen, -0.2 * image_w, 1.2 * image_w)
    cy = uniform((count,), gen, -0.2 * image_h, 1.2 * image_h)
    w = uniform((count,), gen, min_size, max_size)
    h = uniform((count,), gen, min_size, max_size)
    rois = torch.stack([index, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)
    return rois.to(dtype)


class FakeTerminal:
    """A stand-in for stderr that says it is a terminal, so that tqdm (disable=None) draws."""

    def __init__(self) -> None:
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def one_to_one(compatible: torch.Tensor) -> list[tuple[int, int]]:
    """A maximum matching of the bipartite graph compatible[i, j] (Kuhn's augmenting paths):
    (i, j) pairs, no i and no j twice."""
    partner: dict[int, int] = {}  # j -> i

    def augment(i: int, seen: set[int]) -> bool:
        for j in torch.nonzero(compatible[i]).flatten().tolist():
            if j not in seen:
                seen.add(j)
                if j not in partner or augment(partner[j], seen):
                    partner[j] = i
                    return True
        return False

    for i in range(compatible.shape[0]):
        augment(i, set())
    return sorted((i, j) for j, i in partner.items())
