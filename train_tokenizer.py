"""Stage 1: train a ProVQ tokenizer with Accelerate (arXiv 2603.22304). The command lives in provq.commands.train_tokenizer; installed, it is ``provq-train-tokenizer``."""

from provq.commands.train_tokenizer import entry

if __name__ == "__main__":
    entry()
