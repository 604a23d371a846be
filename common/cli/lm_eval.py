"""lm-eval's command line with this toolkit's models registered and the offline suite on the path.

    python -m common.cli.lm_eval run --model sparse-hf \
        --model_args pretrained=DIR,sites=input+intermediate,rule=topp,value=0.9,stats_file=stats.json \
        --tasks bb_social_iqa bb_movie_recommendation --limit 100

``sparse-hf`` (dense and MoE models) and ``llada-sparse`` (LLaDA) are registered; the offline
suite's YAML folder is added with ``--include_path`` unless one is given.
"""

from __future__ import annotations

import sys

from common.cli.flags import run_main


def main() -> None:
    import common.evaluation.bridge  # noqa: F401  (registers sparse-hf)
    from lm_eval.__main__ import cli_evaluate

    from common.evaluation.plugins import load_plugins
    from common.evaluation.tasks import offline_task_dir

    load_plugins()  # the specialized packages' models (llada-sparse)

    if "--include_path" not in sys.argv and len(sys.argv) > 1 and sys.argv[1] == "run":
        sys.argv += ["--include_path", str(offline_task_dir())]
    cli_evaluate()


if __name__ == "__main__":
    run_main(main)  # bad model arguments: one line, before any model is loaded
