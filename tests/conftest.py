import os

# The Triton interpreter must be chosen before triton is imported anywhere: it lets the real kernels run on
# CPU tensors in CI, which has no GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
