"""TDLRT calibration (spec Sec. 10): short runs on validation data only, to fix the init and truncation rule.

Usage: uv run python scripts/tdlrt_calibrate.py INIT RULE [EPOCHS] [OUT]; writes OUT/<init>-<rule>/.../history.json.
Test accuracy is logged by the loop but is NOT used for the choice (validation loss/accuracy and eval CR are).
"""
import sys

from pipeline.tdlrt import TDLRTConfig, train_tdlrt

init, rule = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 1
out = sys.argv[4] if len(sys.argv) > 4 else "outputs/tdlrt_calib"
cfg = TDLRTConfig(tau=0.15, seed=0, epochs=epochs, init=init, rule=rule, num_threads=1)
train_tdlrt(cfg, output_dir=f"{out}/{init}-{rule}", progress=False)
