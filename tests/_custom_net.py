"""A CNN that no registry of the toolkit knows (tests import it as ``_custom_net:make_net``)."""

from torch import nn


class OddNet(nn.Module):
    """Two branches, a grouped conv and a non-square kernel: nothing the reference models look like."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.left = nn.Sequential(nn.Conv2d(16, 24, (3, 5), padding=(1, 2)), nn.ReLU(), nn.Conv2d(24, 24, 3, padding=1))
        self.right = nn.Conv2d(16, 24, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(24 * 4, num_classes)

    def forward(self, x):
        x = nn.functional.relu(self.stem(x))
        return self.head(self.pool(self.left(x) + self.right(x)).flatten(1))


def make_net(num_classes: int = 10) -> OddNet:
    return OddNet(num_classes)
