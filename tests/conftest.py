import os

# The Triton interpreter must be chosen before triton is imported anywhere: it lets the real kernels run on
# CPU tensors in CI, which has no GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    # The CI box has 2 shared cores: two OpenMP threads fighting other jobs cost ~ms per op (measured 5x
    # slower); one thread is steadier. Restored after each test, so other modules keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DynamoCounts:
    """What dynamo compiled since the `dynamo` fixture reset it (graph breaks, graphs)."""

    @property
    def graph_breaks(self) -> int:
        from torch._dynamo.utils import counters

        return sum(counters["graph_break"].values())

    @property
    def graphs(self) -> int:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]


@pytest.fixture
def dynamo() -> DynamoCounts:
    """A fresh dynamo (no cached graphs, zeroed counters) for a test that compiles and counts."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    return DynamoCounts()
