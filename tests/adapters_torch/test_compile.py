"""``torch.compile`` with a selective (Mamba) layer: one recompile per reduction event."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from compressm_torch import CompreSSM, Mamba  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mamba = Mamba(8, 12)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mamba(x)).mean()


# Warnings Dynamo itself raises while tracing (it instantiates autograd.Function and reads
# ``.grad`` of fake tensors), not the traced code's.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated.*:DeprecationWarning")
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)
def test_mamba_recompiles_once_per_event_and_the_recording_hook_is_never_traced() -> None:
    torch.manual_seed(0)
    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        graphs.append(len(gm.graph.nodes))  # one call per graph Dynamo compiles
        return gm.forward

    torch._dynamo.reset()
    net = Net()
    model = torch.compile(net, backend=backend)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    ctl = CompreSSM(
        model,
        opt,
        total_steps=40,
        mode="fixed",
        fraction=0.25,
        reduction_steps=[6, 12, 18],
        calibration_steps=2,  # the recorder switches on at steps 4-5, 10-11, 16-17
    )
    x = torch.randn(4, 10, 8, generator=torch.Generator().manual_seed(1))
    counts, sizes = [], []
    for _ in range(24):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.step()
        counts.append(len(graphs))
        sizes.append(net.mamba.d_state)
    assert sizes[4:7] == [12, 9, 9]
    assert sizes[-1] == 4
    first = counts[0]
    # nothing new while the recorder switches on and off; one graph for each new size
    assert counts[:6] == [first] * 6
    assert counts == [first] * 6 + [first + 1] * 6 + [first + 2] * 6 + [first + 3] * 6
    torch._dynamo.reset()
