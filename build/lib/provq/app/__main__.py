"""python -m provq.app --tokenizer DIR [--prior DIR] [--dataset NAME]: look at a tokenizer and its samples in
a browser (reconstruct, hardness, codebook, generate)."""

from __future__ import annotations

from provq.common.cli import CommandParser, command_name, run_command

COMMAND = "python -m provq.app"


def build_parser() -> CommandParser:
    parser = CommandParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder (config.json + model.safetensors)")
    parser.add_argument("--prior", default=None, help="prior folder trained on this tokenizer's codes")
    parser.add_argument("--dataset", default=None, help="emoji, a folder or a hub dataset: its test split")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    return parser


def start(argv=None, block: bool = True):
    """Load the models, build the page and serve it; returns the Gradio Blocks (``block=False`` keeps
    serving in the background, as the browser test does)."""
    from provq.app.session import AppSession
    from provq.app.ui import build

    args = build_parser().parse_args(argv)
    session = AppSession.load(args.tokenizer, args.prior, args.dataset)
    page = build(session)
    page.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=not block,
                show_error=True, quiet=not block)
    return page


def main(argv=None):
    return start(argv, block=True)


def entry() -> None:
    """The console command (``provq-...``) and ``python -m``."""
    run_command(command_name(COMMAND), main)


if __name__ == "__main__":
    entry()
