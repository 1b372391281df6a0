"""HSV trajectories of a small LRU-like layer in training, with Weyl bounds and a rank certificate.

A small version of Fig. 2 of the CompreSSM paper. One LRU-like layer with n = 8 complex states,

    x_t = diag(lambda) x_{t-1} + gamma * B u_t,    y_t = Re(C x_t) + D u_t,
    lambda = exp(-exp(nu) + i exp(theta)),         gamma = sqrt(1 - |lambda|^2),

is trained with Adam to reproduce a fixed order-4 linear filter (two damped resonances) from
white-noise input sequences generated with a fixed seed; nothing is downloaded. The layer runs
as a causal convolution with its kernel Re(C lambda^k gamma B), vectorised over time.

After every optimizer step (or every ``--every`` steps) the detached parameters give the system
(lambda, gamma B, C). The script computes its 2n = 16 Hankel singular values of the real-output
realization (``real_output=True``: the HSVs of the map u -> Re(C x)), the Weyl bound
``hsv_perturbation_bound(previous, current)`` of Lemma 3.1, and feeds both to a ``RankTracker``,
which matches the HSVs across checks by the overlap of the eigenvectors of ``hankel_operator``.
It plots (a) the matched HSV trajectories with error bars of +-(per-check Weyl bound) every 100
steps, (b) the per-check bound against the actual HSV movement and the gaps between HSVs, and
(c) the margin of the ranking certificate at the candidate cut r = 4 (the teacher's order).
Adam's learning rate follows a cosine decay to zero. Seeds are fixed: the run is deterministic.

Needs torch and matplotlib. Run from the repository root (CPU, 10 to 20 seconds):

    python examples/hsv_trajectories.py --steps 1500 --out docs/img/hsv_trajectories.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

import compressm_core as cc

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DTYPE = torch.float64
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "img" / "hsv_trajectories.png"


class LRULayer(torch.nn.Module):
    """Single-input single-output LRU-like layer with ``n`` complex diagonal states."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        super().__init__()
        r_min, r_max, max_phase = 0.5, 0.95, np.pi / 2
        u1, u2 = (
            torch.rand(n, generator=gen, dtype=DTYPE),
            torch.rand(n, generator=gen, dtype=DTYPE),
        )
        modulus = torch.sqrt(u1 * (r_max**2 - r_min**2) + r_min**2)  # uniform on the ring
        self.nu = torch.nn.Parameter(torch.log(-torch.log(modulus)))
        self.theta = torch.nn.Parameter(torch.log(0.05 + max_phase * u2))
        self.b_re = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=DTYPE) / 2**0.5)
        self.b_im = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=DTYPE) / 2**0.5)
        self.c_re = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=DTYPE) / n**0.5)
        self.c_im = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=DTYPE) / n**0.5)
        self.d = torch.nn.Parameter(torch.zeros((), dtype=DTYPE))

    def system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poles ``lambda``, input vector ``gamma * B`` and output vector ``C`` (complex)."""
        poles = torch.exp(torch.complex(-torch.exp(self.nu), torch.exp(self.theta)))
        gamma = torch.sqrt(1 - poles.abs() ** 2)
        b = gamma * torch.complex(self.b_re, self.b_im)
        return poles, b, torch.complex(self.c_re, self.c_im)

    def kernel(self, length: int) -> torch.Tensor:
        """Impulse response ``h_0 = Re(C gamma B) + D``, ``h_k = Re(C lambda^k gamma B)``."""
        poles, b, c = self.system()
        k = torch.arange(length, dtype=DTYPE)
        h = torch.real(poles[None, :] ** k[:, None] @ (b * c))
        return h + torch.where(k == 0, self.d, torch.zeros((), dtype=DTYPE))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """Causal convolution of ``(batch, L)`` inputs with the kernel, as one matrix product."""
        return u @ toeplitz(self.kernel(u.shape[-1])).T

    def detached(self) -> cc.DiagonalStateSpace:
        """The current system as NumPy arrays, in the layer's own state coordinates."""
        poles, b, c = (x.detach().numpy() for x in self.system())
        return cc.DiagonalStateSpace(poles, b[:, None], c[None, :])


def toeplitz(kernel: torch.Tensor) -> torch.Tensor:
    """Lower-triangular Toeplitz matrix ``T[t, s] = kernel[t - s]`` for ``t >= s``."""
    k = torch.arange(kernel.shape[0])
    lag = k[:, None] - k[None, :]
    return torch.where(lag >= 0, kernel[lag.clamp(min=0)], torch.zeros((), dtype=kernel.dtype))


def teacher_kernel(length: int) -> torch.Tensor:
    """Order-4 target filter: two damped resonances, HSVs 1.65, 1.40, 0.31, 0.20."""
    k = torch.arange(length, dtype=DTYPE)
    return 0.3 * 0.95**k * torch.cos(0.3 * k) + 0.2 * 0.8**k * torch.cos(1.3 * k)


def eigenvectors(sys: cc.DiagonalStateSpace) -> np.ndarray:
    """Eigenvectors of H = (P^1/2 Q P^1/2)^1/2, columns in descending order of the HSVs."""
    _, vectors = np.linalg.eigh(np.asarray(cc.hankel_operator(sys, real_output=True)))
    return vectors[:, ::-1]


def train(args: argparse.Namespace) -> dict[str, object]:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    layer = LRULayer(args.states, gen)
    inputs = torch.randn(args.samples, args.length, generator=gen, dtype=DTYPE)
    targets = inputs @ toeplitz(teacher_kernel(args.length)).T
    optimizer = torch.optim.Adam(layer.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

    previous = layer.detached()
    hsv = np.asarray(cc.hankel_singular_values(previous, real_output=True))
    vectors = eigenvectors(previous)
    tracker = RankTrackerLog(cc.RankTracker(), args.rank, args.window)
    tracker.update(0, hsv, None, None)
    losses = []
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, args.samples, (args.batch,), generator=gen)
        loss = torch.mean((layer(inputs[batch]) - targets[batch]) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % args.every and step != args.steps:
            continue
        current = layer.detached()
        hsv = np.asarray(cc.hankel_singular_values(current, real_output=True))
        bound = float(cc.hsv_perturbation_bound(previous, current, real_output=True))
        new_vectors = eigenvectors(current)
        cost = 1.0 - np.abs(vectors.T @ new_vectors) ** 2  # follow states through crossings
        tracker.update(step, hsv, bound, cost)
        previous, vectors = current, new_vectors
    with torch.no_grad():
        full_loss = float(torch.mean((layer(inputs) - targets) ** 2))
    return {"losses": np.array(losses), "full_loss": full_loss, "log": tracker}


class RankTrackerLog:
    """A ``RankTracker`` plus the per-check numbers the figure needs."""

    def __init__(self, tracker: cc.RankTracker, rank: int, window: int) -> None:
        self.tracker, self.rank, self.window = tracker, rank, window
        self.steps: list[int] = []
        self.sorted: list[np.ndarray] = []
        self.bounds: list[float] = []
        self.margins: list[float] = []  # accumulated: g_r - 2 A_r (RankTracker)
        self.one_step: list[float] = []  # one check: sigma_r - sigma_{r+1} - 2 beta
        self.certified: list[bool] = []
        self.reanchored: list[int] = []

    def update(
        self, step: int, hsv: np.ndarray, bound: float | None, cost: np.ndarray | None
    ) -> None:
        anchor = self.tracker.anchors[self.rank - 1] if self.tracker.n else 0
        self.tracker.update(hsv, bound, cost=cost)
        self.steps.append(step)
        self.sorted.append(np.sort(hsv)[::-1])
        self.margins.append(self.tracker.certificate(self.rank).margin)
        self.certified.append(self.tracker.certified(self.rank, self.window))
        if bound is None:
            return
        self.bounds.append(bound)
        self.one_step.append(cc.ranking_certificate(self.sorted[-2], bound, self.rank).margin)
        if self.tracker.anchors[self.rank - 1] != anchor:
            self.reanchored.append(step)


def plot(result: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    log = result["log"]
    assert isinstance(log, RankTrackerLog)
    steps = np.array(log.steps)
    hsv = np.stack(log.sorted)
    bounds = np.array(log.bounds)
    trajectories = log.tracker.trajectories()
    moves = np.abs(np.diff(hsv, axis=0)).max(axis=1)  # Weyl compares the sorted HSVs
    held = moves <= bounds + 1e-10 * hsv[:-1, 0]
    gaps = hsv[:, :-1] - hsv[:, 1:]
    r = args.rank
    certified = np.array(log.certified)
    first = int(steps[np.argmax(certified)]) if certified.any() else -1
    # start of the stretch that lasts to the end (-1 if the last check is not certified)
    trailing = len(certified) if certified.all() else int(np.argmin(certified[::-1]))
    last = int(steps[len(certified) - trailing]) if trailing else -1

    fig = plt.figure(figsize=(10, 7), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.15, 1])
    ax_a = fig.add_subplot(grid[0, :])
    ax_b = fig.add_subplot(grid[1, 0])
    ax_c = fig.add_subplot(grid[1, 1])
    fig.suptitle(
        f"HSVs of an LRU-like layer (n = {args.states} complex states, real output) "
        f"during {args.steps} Adam steps",
        fontsize=12,
    )

    # (a) matched trajectories with +- per-check Weyl bound as error bars at a few steps
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, trajectories.shape[1]))
    floor = 10 ** np.floor(np.log10(hsv[:, -1].min()))
    marks = np.searchsorted(steps, np.arange(50, steps[-1], 100))  # every 100 steps from 50
    beta = np.concatenate([[0.0], bounds])[marks]
    order = np.argsort(-trajectories[-1])
    for rank, i in enumerate(order, start=1):
        y = trajectories[:, i]
        color = colors[rank - 1]
        ax_a.plot(steps, y, color=color, lw=1.8 if rank in (r, r + 1) else 1.0)
        lower = np.minimum(beta, y[marks] - floor)  # clip at the bottom of the log axis
        ax_a.errorbar(
            steps[marks],
            y[marks],
            yerr=[lower, beta],
            fmt="none",
            ecolor=color,
            capsize=2.5,
            lw=0.9,
            alpha=0.8,
        )
    ax_a.set_yscale("log")
    ax_a.set_ylim(floor, hsv.max() * 2)
    ax_a.set_xlim(0, steps[-1])
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel(r"Hankel singular value $\sigma_i$")
    ax_a.set_title(
        r"(a) the 16 HSVs, matched across steps by eigenvectors of $H$; error bars: "
        r"$\pm\beta_t = \pm\|H_t - H_{t-1}\|_2$, the per-step Weyl bound",
        fontsize=10,
    )
    ax_a.text(
        0.99,
        0.04,
        f"thick: the pair at the candidate cut r = {r}",
        transform=ax_a.transAxes,
        ha="right",
        fontsize=9,
    )

    # (b) per-check bound vs the movement and the gaps
    ax_b.semilogy(steps[1:], bounds, color="C3", lw=1.2, label=r"Weyl bound $\beta_t$")
    ax_b.semilogy(
        steps[1:], moves, color="k", lw=0.6, alpha=0.7, label=r"actual $\max_i|\Delta\sigma_i|$"
    )
    ax_b.semilogy(
        steps,
        gaps.min(axis=1),
        color="C0",
        lw=1.0,
        label=r"smallest gap $\min_i(\sigma_i-\sigma_{i+1})$",
    )
    ax_b.semilogy(
        steps,
        gaps[:, r - 1],
        color="C2",
        lw=1.0,
        label=rf"gap at the cut $\sigma_{r}-\sigma_{r + 1}$",
    )
    ax_b.set_xlim(0, steps[-1])
    ax_b.set_ylim(bottom=max(bounds.min(), 1e-12) / 100)
    ax_b.set_xlabel("training step")
    ax_b.set_ylabel("size")
    ax_b.set_title(
        f"(b) per-step bound vs gaps (bound held at {held.sum()}/{held.size} checks)", fontsize=10
    )
    ax_b.legend(fontsize=8, loc="lower left", ncol=2)

    # (c) ranking-certificate margin at the cut
    margins = np.array(log.margins)
    ax_c.plot(steps, margins, color="C2", lw=1.3, label=r"accumulated: $g_r - 2A_r$ (RankTracker)")
    ax_c.plot(
        steps[1:],
        log.one_step,
        color="C1",
        lw=0.8,
        alpha=0.8,
        label=r"one step: $\sigma_r-\sigma_{r+1}-2\beta_t$",
    )
    if log.reanchored:
        anchored = np.isin(steps, log.reanchored)
        ax_c.plot(
            steps[anchored],
            margins[anchored],
            "x",
            color="C3",
            ms=5,
            label=f"re-anchored ({len(log.reanchored)}x)",
        )
    ax_c.axhline(0.0, color="k", lw=0.6)
    ax_c.fill_between(
        steps,
        0,
        1,
        where=certified,
        step="post",
        transform=ax_c.get_xaxis_transform(),
        color="C2",
        alpha=0.12,
        lw=0,
        label=f"certified (streak $\\geq$ {args.window} checks)",
    )
    if first >= 0:
        ax_c.axvline(first, color="C2", ls="--", lw=1.0)
        note = f"first certified: step {first} "
        if last >= 0:
            ax_c.axvline(last, color="C2", ls="-", lw=1.0)
            note += f"\ncertified to the end from step {last} "
        ax_c.text(first, 0.3, note, transform=ax_c.get_xaxis_transform(), ha="right", fontsize=8)
    ax_c.set_xlim(0, steps[-1])
    ax_c.set_xlabel("training step")
    ax_c.set_ylabel(r"margin $m$ at $r = %d$" % r)  # noqa: UP031  (braces are TeX here)
    ax_c.set_title(f"(c) ranking certificate at the cut r = {r}", fontsize=10)
    ax_c.legend(fontsize=8, loc="lower right")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    moved = moves > 1e-10 * hsv[1:, 0]  # above the rounding floor
    ratio = bounds[moved] / moves[moved]
    return {
        "held": int(held.sum()),
        "checks": int(held.size),
        "ratio": float(np.median(ratio)) if ratio.size else float("nan"),
        "first": first,
        "last": last,
        "reanchored": len(log.reanchored),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="Adam steps (default 1500)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--every", type=int, default=1, help="check every k steps (default 1)")
    parser.add_argument("--rank", type=int, default=4, help="candidate cut r (default 4)")
    parser.add_argument(
        "--window", type=int, default=100, help="checks a cut must hold (default 100)"
    )
    parser.add_argument("--states", type=int, default=8, help="complex states n (default 8)")
    parser.add_argument("--length", type=int, default=64, help="sequence length (default 64)")
    parser.add_argument("--samples", type=int, default=512, help="training sequences")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (cosine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.perf_counter()
    result = train(args)
    summary = plot(result, args)
    losses = result["losses"]
    assert isinstance(losses, np.ndarray)
    log = result["log"]
    assert isinstance(log, RankTrackerLog)
    final = log.sorted[-1]
    print(
        f"{args.steps} Adam steps, {summary['checks']} checks, {time.perf_counter() - start:.1f} s"
    )
    print(f"loss: first batch {losses[0]:.3e}, last batch {losses[-1]:.3e}, ", end="")
    print(f"all {args.samples} sequences {result['full_loss']:.3e}")
    print("final HSVs:", np.array2string(final, precision=3, max_line_width=99))
    print(
        f"Weyl bound held at {summary['held']}/{summary['checks']} checks "
        f"(median bound / actual movement {summary['ratio']:.2f})"
    )
    if summary["first"] < 0:
        print(f"cut r = {args.rank}: not certified for a window of {args.window} checks")
    else:
        print(
            f"cut r = {args.rank}: first certified (window {args.window}) at step "
            f"{summary['first']}, certified without a break from step {summary['last']} to the "
            f"end; re-anchored {summary['reanchored']} times; final margin "
            f"{log.margins[-1]:.3e} (gap {final[args.rank - 1] - final[args.rank]:.3e})"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
