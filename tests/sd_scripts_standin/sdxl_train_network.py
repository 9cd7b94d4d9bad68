"""Stand-in for kohya-ss sd-scripts' sdxl_train_network.py (see train_network.py here)."""

# ruff: noqa: E501  (sd-scripts' messages, verbatim)

from __future__ import annotations

import argparse

import train_network
from library import train_util


# mypy cannot follow the import of the sibling script, so the base class is Any to it.
class SdxlNetworkTrainer(train_network.NetworkTrainer):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.is_sdxl = True

    def assert_extra_args(self, args: argparse.Namespace) -> None:
        # sd-scripts' own check, with its message.
        assert args.network_train_unet_only or not args.cache_text_encoder_outputs, (
            "network for Text Encoder cannot be trained with caching Text Encoder outputs / Text Encoderの出力をキャッシュしながらText Encoderのネットワークを学習することはできません"
        )


def setup_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = train_network.setup_parser()
    return parser


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    trainer = SdxlNetworkTrainer()
    trainer.train(args)
