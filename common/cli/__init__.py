"""What the experiment scripts share: flags, one-line errors, the sweep study both sweeps run."""

from common.cli.flags import (add_sweep_arguments, default_device, output_folder, parse_dtype, run_main,
                              sweep_settings)

__all__ = ["add_sweep_arguments", "default_device", "output_folder", "parse_dtype", "run_main", "sweep_settings"]
