"""Run by tests/test_train.py under ``torchrun --nproc_per_node 2``: a few DDP training steps of a tiny
model with an SQ or PACT hook (gloo, CPU); each rank writes its final weights and SQ selections to
``OUT/rank{r}.pt``.  Usage: ddp_worker.py OUT {sq|pact}."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def synthetic(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + y[:, None, None, None].float() / 5
    return x, y


def main() -> None:
    out, scheme = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from tvm_lowbit.quantizers.pact import PACT
    from tvm_lowbit.quantizers.sq import SQ
    from tvm_lowbit.quantizers.train import train

    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = TinyNet()
    cfg = SQ(inner="twn", schedule=(0.5, 1.0), seed=3) if scheme == "sq" else PACT(act_bits=3, weight_bits=3)
    res = train(model, cfg, synthetic(), epochs_per_stage=1, lr=0.05, batch_size=16, progress=False, log=None,
                seed=1)
    hook = res["hook"]
    sel = {k: v.clone() for k, v in hook.selections().items()} if scheme == "sq" else {}
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "selections": sel,
                "hook": hook.state_dict(), "steps": hook.step_count}, out / f"rank{rank}.pt")
    dist.barrier()  # no rank tears down gloo while its peer is still talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
