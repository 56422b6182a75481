"""`chatforge pipeline`: every stage in order from one config (the main job: `chatforge.pipeline`).

The pipeline runs each stage as a `chatforge` command line; it is handed this package's `main` to
do so (`run_pipeline(main, ...)`), since the pipeline layer does not import the command line.
"""

from __future__ import annotations

import argparse

from chatforge.commands import add_config, config_from, leaf
from chatforge.commands.main import main
from chatforge.pipeline import PipelineOptions, run_pipeline


def configure(parser: argparse.ArgumentParser) -> None:
    add_config(parser, PipelineOptions)
    parser.epilog = ("example:\n  chatforge pipeline\n  chatforge pipeline --input examples/my_docs --name acme\n"
                     "  chatforge pipeline --base scratch --name from-scratch\n"
                     "  chatforge pipeline --config chatforge.yaml --until pretrain\n"
                     "  chatforge pipeline --feedback runs/demo/feedback.db\n"
                     "  chatforge pipeline --generated-prefs --align ppo\n"
                     "  chatforge pipeline --rollback")
    # --config is the pipeline's own (a section per stage), not a YAML file of these flags.
    leaf(parser, run, yaml_config=False)


def run(args: argparse.Namespace) -> int:
    return run_pipeline(main, config_from(args, PipelineOptions))
