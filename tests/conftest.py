"""Test configuration shared by all test modules."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import torch

# The test problems are tiny: torch's intra-op thread pool only adds contention on the
# 2-core CI machines (tiny ops became ~1000x slower when another process was busy).
torch.set_num_threads(1)
