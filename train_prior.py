"""Stage 2: train the class-conditional AR prior (LlamaGen-style) over cached tokenizer codes. The command lives in provq.commands.train_prior; installed, it is ``provq-train-prior``."""

from provq.commands.train_prior import entry

if __name__ == "__main__":
    entry()
