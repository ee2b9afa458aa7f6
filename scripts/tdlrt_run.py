"""Background driver used before the CLI existed; same configs as `sigma-compress tdlrt` (resumable either way)."""
import sys
import torch
from pipeline.tdlrt import TDLRTConfig, train_tdlrt

method, tau, seed, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
extra = dict(a.split("=", 1) for a in sys.argv[5:])
kw = {}
for k, v in extra.items():
    kw[k] = int(v) if k in ("epochs", "train_subset") else v
cfg = TDLRTConfig(method=method, tau=tau, seed=seed, num_threads=1, **kw)
train_tdlrt(cfg, output_dir=out, progress=False)
