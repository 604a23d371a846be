"""What the experiment scripts share: flags, one-line errors, the sweep study both sweeps run."""

from common.cli.flags import (add_sweep_arguments, check_device, check_output_folder, choose_dtype, finite_float,
                              non_negative_int, output_folder, positive_float, positive_int, parse_dtype, run_main,
                              sweep_settings)

__all__ = ["add_sweep_arguments", "check_device", "check_output_folder", "choose_dtype", "finite_float",
           "non_negative_int", "output_folder", "positive_float", "positive_int", "parse_dtype", "run_main", "sweep_settings"]
